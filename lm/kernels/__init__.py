"""textgen's own kernels: the training LSTM and the native module that holds both C++ sources.

native.py       builds and loads the C++ module (`python -m lm.kernels.native build`)
train_lstm.py   the training step's LSTM, forward and backward, through the module
csrc/           int8_step.cpp (the int8 decode step's loops, used by lm/decode/native_int8.py)
                and lstm_train.cpp (train_lstm.py's recurrence and dropout)
"""
