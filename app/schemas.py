"""Request and response bodies, named by role. Bounds live here so that the API docs show them.

Every request body is a `RequestBody` (app/bodies.py): strict types, and no NUL or lone surrogate
in its text. The native routes refuse unknown fields (a typo such as `temprature` is a 422, not a
silent default); the /v1 routes ignore them, as OpenAI-compatible servers do, because clients send
fields this service has no use for, and take null for any optional field, as OpenAI does.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, field_validator, model_validator

from app.bodies import RequestBody
from lm.constrain import MAX_CHOICES, Constraint
from lm.errors import ConfigError
from lm.sampler import LOGIT_BIAS_LIMIT, MAX_LOGIT_BIAS, MAX_STOP_STRINGS

StopString = Annotated[str, Field(min_length=1, max_length=256)]
Seed = Annotated[int, Field(ge=0, le=2**63 - 1)]
FinishReason = Literal["length", "stop"]


def _stop_list(value: object) -> object:
    """`"stop": "\\n"` means `["\\n"]`; null means none."""
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    return value


# OpenAI's logit_bias: a JSON object, token id (as a decimal string: JSON keys are strings) -> bias
LogitBias = Annotated[
    dict[str, Annotated[float, Field(ge=-LOGIT_BIAS_LIMIT, le=LOGIT_BIAS_LIMIT)]],
    Field(
        max_length=MAX_LOGIT_BIAS,
        description="token id (a decimal string) -> bias in [-100, 100], added to the token's logit before "
        "sampling: -100 bans it in practice, 100 forces it (OpenAI's logit_bias). The ids are the model's "
        "tokenizer's (POST /tokenize)",
    ),
]
MAX_CONSTRAINT_CHARS = 65536
STRUCTURED_OUTPUTS = (
    "vLLM's structured_outputs: exactly one of regex, choice, json (a schema), grammar, json_object; the "
    "generated text matches it (docs/API.md, Constrained output)"
)
SKIP_SPECIAL_TOKENS = (
    "true (default): the tokenizer's special tokens (the unknown token, which reads as U+FFFD) are never "
    "sampled; false: the model may sample them"
)


def _token_ids(value: dict[str, float] | None) -> dict[str, float] | None:
    """logit_bias keys are token ids: decimal integers."""
    for key in value or {}:
        if not (key.isascii() and key.isdigit() and len(key) <= 10):
            raise ValueError(f'logit_bias keys are token ids, decimal integers such as "42"; got {key!r}')
    return value


def logit_bias_ids(value: dict[str, float] | None) -> tuple[tuple[int, float], ...]:
    """The validated logit_bias as SamplingParams takes it: (token id, bias) pairs, by id."""
    return tuple(sorted((int(key), bias) for key, bias in (value or {}).items()))


# ---------------------------------------------------------------------------- constrained output


class StructuredOutputs(RequestBody):
    """vLLM's structured_outputs: exactly one of its fields; the text generated must match it (lm/constrain.py)."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    regex: str | None = Field(None, max_length=MAX_CONSTRAINT_CHARS, description="a regex the whole text matches")
    choice: list[str] | None = Field(
        None, min_length=1, max_length=MAX_CHOICES, description="the text is exactly one of these strings"
    )
    json_: dict[str, Any] | bool | str | None = Field(
        None, alias="json", description="a JSON schema (an object, or its JSON text) the text is an instance of"
    )
    grammar: str | None = Field(
        None, max_length=MAX_CONSTRAINT_CHARS, description="a Lark grammar (llguidance's syntax), or a GBNF one"
    )
    json_object: bool | None = Field(None, description="true: any JSON object (as response_format json_object)")

    def constraint(self, param: str = "structured_outputs") -> Constraint:
        """The one constraint given. ConfigError when none or several are, or the JSON text is not JSON."""
        given = [name for name in ("regex", "choice", "json", "grammar", "json_object") if self._given(name)]
        if len(given) != 1:
            found = ", ".join(given) if given else "none"
            raise ConfigError(
                f"{param} takes exactly one of regex, choice, json, grammar, json_object; got {found}", param
            )
        kind = given[0]
        if kind == "regex":
            return Constraint.regex(self.regex or "", f"{param}.regex")
        if kind == "choice":
            return Constraint.choice(self.choice or [], f"{param}.choice")
        if kind == "grammar":
            return Constraint.grammar(self.grammar or "", f"{param}.grammar")
        if kind == "json_object":
            return Constraint.json(None, f"{param}.json_object")
        schema = self.json_
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except ValueError as e:
                raise ConfigError(f"{param}.json is not JSON: {e}", f"{param}.json") from None
        return Constraint.json(schema, f"{param}.json")

    def _given(self, name: str) -> bool:
        value = self.json_ if name == "json" else getattr(self, name)
        return value is not None and value is not False


class ResponseFormatText(RequestBody):
    model_config = ConfigDict(extra="ignore")

    type: Literal["text"]


class ResponseFormatJsonObject(RequestBody):
    model_config = ConfigDict(extra="ignore")

    type: Literal["json_object"]


class JsonSchemaFormat(RequestBody):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)

    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema", description="the JSON schema; absent: any JSON object")
    strict: bool | None = Field(None, description="textgen always enforces the schema, strict or not")


class ResponseFormatJsonSchema(RequestBody):
    model_config = ConfigDict(extra="ignore")

    type: Literal["json_schema"]
    json_schema: JsonSchemaFormat


def _format_type(value: object) -> object:
    return value.get("type") if isinstance(value, dict) else getattr(value, "type", None)


# chosen by "type", so that a fault is reported once, at its place (`response_format.json_schema.name`)
ResponseFormat = Annotated[
    Annotated[ResponseFormatText, Tag("text")]
    | Annotated[ResponseFormatJsonObject, Tag("json_object")]
    | Annotated[ResponseFormatJsonSchema, Tag("json_schema")],
    Discriminator(
        _format_type,
        custom_error_type="response_format_type",
        custom_error_message="type must be one of text, json_object, json_schema",
    ),
]


def request_constraint(structured_outputs: StructuredOutputs | None, response_format: Any = None) -> Constraint | None:
    """The constraint a request asks for, from vLLM's structured_outputs or OpenAI's response_format (at most
    one of them); None for neither, or response_format text. ConfigError naming the field otherwise."""
    wants_format = response_format is not None and not isinstance(response_format, ResponseFormatText)
    if structured_outputs is not None and wants_format:
        raise ConfigError("give either response_format or structured_outputs, not both", "structured_outputs")
    if structured_outputs is not None:
        return structured_outputs.constraint()
    if isinstance(response_format, ResponseFormatJsonObject):
        return Constraint.json(None, "response_format")
    if isinstance(response_format, ResponseFormatJsonSchema):
        return Constraint.json(response_format.json_schema.schema_, "response_format.json_schema.schema")
    return None


# ---------------------------------------------------------------------------- native


class GenerateRequest(RequestBody):
    model_config = ConfigDict(extra="forbid")

    prompt: str = Field("", description="text to continue; empty starts from the model's start token")
    model: str | None = Field(None, description="model id; default: the active model")
    max_tokens: int = Field(200, ge=0, description="at most TEXTGEN_MAX_TOKENS; 0 (no completion) with prompt_logprobs")
    prompt_logprobs: int | None = Field(
        None,
        ge=0,
        le=5,
        description="score the prompt: each prompt token's log-probability and its k likeliest alternatives, "
        "under the fp32 forward `textgen eval` runs (vLLM's SamplingParams field); null = off",
    )
    temperature: float = Field(1.0, ge=0, le=5, description="0 = greedy")
    top_k: int = Field(0, ge=0, description="0 = off")
    top_p: float = Field(1.0, gt=0, le=1)
    min_p: float = Field(0.0, ge=0, lt=1)
    repetition_penalty: float = Field(1.0, gt=0, le=10)
    stop: list[StopString] = Field(default_factory=list, max_length=MAX_STOP_STRINGS)
    seed: Seed | None = None
    logit_bias: LogitBias | None = None
    skip_special_tokens: bool = Field(True, description=SKIP_SPECIAL_TOKENS)
    structured_outputs: StructuredOutputs | None = Field(None, description=STRUCTURED_OUTPUTS)
    stream: bool = False

    _stop = field_validator("stop", mode="before")(_stop_list)
    _logit_bias = field_validator("logit_bias")(_token_ids)


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class PromptLogprob(BaseModel):
    """One prompt token, scored: `logprob` and `top_logprobs` are null for the first (nothing predicts it)."""

    id: int
    token: str = Field(description="the token's text (a byte-level piece that is part of a character reads U+FFFD)")
    offset: int = Field(description="where the token starts in the prompt, in characters")
    logprob: float | None
    top_logprobs: dict[str, float] | None


class GenerateResponse(BaseModel):
    id: str
    model: str
    text: str
    finish_reason: FinishReason
    usage: Usage
    prompt_logprobs: list[PromptLogprob] | None = Field(None, description="with prompt_logprobs: the prompt's tokens")


class ModelPublic(BaseModel):
    id: str
    created_at: str
    parameters: int
    tokenizer: dict[str, Any]
    metrics: dict[str, Any]
    active: bool
    loaded: bool
    size_bytes: int


class ModelDetail(ModelPublic):
    architecture: dict[str, Any]
    training: dict[str, Any]
    chat_template: dict[str, Any]
    versions: dict[str, Any]
    decode: dict[str, Any] | None = Field(
        None,
        description="While loaded: the decode step its engine chose on this CPU (kind, loops, product, threads, "
        "vnni_rows, source), the tokens/s it measured per configuration and batch size, each kind's parity with "
        "the reference, and the CPU",
    )


class UnreadableModel(BaseModel):
    id: str = Field(description="the folder's name in the models folder")
    reason: str = Field(description="why it is not a checkpoint the registry can read")


class ModelList(BaseModel):
    active: str | None
    models: list[ModelPublic]
    unreadable: list[UnreadableModel] | None = Field(
        None,
        description="for admin keys: the folders of the models folder that are not readable checkpoints, "
        "and why (null for other keys)",
    )


class HealthStatus(BaseModel):
    status: Literal["ok"]


class ReadyStatus(BaseModel):
    status: Literal["ready"]
    model: str = Field(description="production's model: the active version this replica serves")
    canary: dict[str, Any] | None = Field(None, description="production's canary, {model, weight}, if it has one")
    redis: Literal["up", "down"] | None = Field(
        None, description="Redis mode only: whether the job system reaches Redis (generation does not need it)"
    )


# ---------------------------------------------------------------------------- OpenAI


class StreamOptions(RequestBody):
    include_usage: bool = False


class _OpenAISampling(RequestBody):
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=5)
    top_p: float = Field(1.0, gt=0, le=1)
    n: int = Field(1, ge=1, le=8)
    stop: list[StopString] = Field(default_factory=list, max_length=MAX_STOP_STRINGS)
    seed: Seed | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    logit_bias: LogitBias | None = None
    skip_special_tokens: bool = Field(True, description=SKIP_SPECIAL_TOKENS + " (vLLM's field, in extra_body)")
    structured_outputs: StructuredOutputs | None = Field(None, description=STRUCTURED_OUTPUTS + " (in extra_body)")
    response_format: ResponseFormat | None = Field(
        None,
        description='OpenAI\'s: {"type": "text"} (no constraint), {"type": "json_object"}, or {"type": "json_schema", '
        '"json_schema": {"name", "schema", "strict"}}; not with structured_outputs',
    )
    user: str | None = Field(None, max_length=256)

    _stop = field_validator("stop", mode="before")(_stop_list)
    _logit_bias = field_validator("logit_bias")(_token_ids)

    @model_validator(mode="before")
    @classmethod
    def _null_is_default(cls, data: object) -> object:
        """OpenAI's optional parameters are nullable: `"temperature": null` means the default, as omitting it does."""
        if not isinstance(data, dict):
            return data
        fields = cls.model_fields
        return {k: v for k, v in data.items() if v is not None or k not in fields or fields[k].is_required()}

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


TokenIds = Annotated[list[int], Field(min_length=1)]
MAX_PROMPTS = 8


def _prompt_kind(value: object) -> str | None:
    if isinstance(value, str):
        return "text"
    if not isinstance(value, list):
        return None
    first = value[0] if value else ""
    if isinstance(first, list):
        return "id_lists"
    return "ids" if isinstance(first, int) and not isinstance(first, bool) else "texts"


# OpenAI's four prompt forms, chosen by the input's kind so that a fault is reported once, at its place
CompletionPrompt = Annotated[
    Annotated[str, Tag("text")]
    | Annotated[list[str], Tag("texts")]
    | Annotated[TokenIds, Tag("ids")]
    | Annotated[list[TokenIds], Tag("id_lists")],
    Discriminator(
        _prompt_kind,
        custom_error_type="prompt_type",
        custom_error_message="Input should be a string, a list of strings, a list of token ids, "
        "or a list of lists of token ids",
    ),
]


class CompletionRequest(_OpenAISampling):
    prompt: CompletionPrompt = ""
    max_tokens: int | None = Field(None, ge=0, description="0 (no completion) with echo: the prompt's scores alone")
    logprobs: int | None = Field(None, ge=0, le=5)
    echo: bool = Field(False, description="the prompt before the completion, in text and (with logprobs) scored")

    @field_validator("prompt")
    @classmethod
    def _prompt_list(cls, value: str | list[str] | list[int] | list[list[int]]) -> object:
        if isinstance(value, list) and _prompt_kind(value) != "ids" and not 1 <= len(value) <= MAX_PROMPTS:
            raise ValueError(f"a prompt list holds 1 to {MAX_PROMPTS} prompts")
        return value

    @property
    def prompts(self) -> list[str | list[int]]:
        """Each prompt, a text or token ids: one choice each (times n)."""
        if isinstance(self.prompt, str) or _prompt_kind(self.prompt) == "ids":
            return [self.prompt]  # type: ignore[list-item]
        return list(self.prompt)  # type: ignore[arg-type]


class TextPart(RequestBody):
    model_config = ConfigDict(extra="ignore")

    type: Literal["text"] = "text"
    text: str


def _content_kind(value: object) -> str | None:
    return "text" if isinstance(value, str) else "parts" if isinstance(value, list) else None


# a string, or a list of parts, chosen by the input's kind: a fault in a part is reported once, at its place
# (`messages.0.content.parts.1.text`), not beside a "should be a valid string" for the other kind
MessageContent = Annotated[
    Annotated[str, Tag("text")] | Annotated[list[TextPart], Tag("parts")],
    Discriminator(
        _content_kind,
        custom_error_type="content_type",
        custom_error_message="Input should be a string or a list of text parts",
    ),
]


class ChatMessage(RequestBody):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant"]
    content: MessageContent | None = None

    @property
    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class ChatCompletionRequest(_OpenAISampling):
    messages: list[ChatMessage] = Field(min_length=1, max_length=256)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=5)


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float | None] = Field(description="null for an echoed prompt's first token")
    top_logprobs: list[dict[str, float] | None] = Field(description="null for an echoed prompt's first token")
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: FinishReason | None = None


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    system_fingerprint: str | None = None
    choices: list[CompletionChoice]
    usage: Usage | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[TokenLogprob]


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: FinishReason


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    system_fingerprint: str | None = None
    choices: list[ChatChoice]
    usage: Usage


class ModelObject(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "textgen"
    alias_for: str | None = Field(default=None, description="aliases only: the model id the alias names")
    canary: dict[str, Any] | None = Field(default=None, description="aliases only: the alias's canary, {model, weight}")


class ModelObjectList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelObject]


# ---------------------------------------------------------------------------- tokenizer routes (textgen's and vLLM's)


class TokenizeRequest(RequestBody):
    """textgen's `{"text"}` (answered with `TokenizeResponse`), or vLLM's `{"prompt"}` or `{"messages"}`
    (answered with `TokenizePromptResponse`): exactly one of the three."""

    model_config = ConfigDict(extra="forbid")

    text: str | None = Field(None, description="textgen's request: the ids and each token's text")
    prompt: str | None = Field(None, description="vLLM's request: answered with {tokens, count, max_model_len}")
    messages: list[ChatMessage] | None = Field(
        None,
        min_length=1,
        max_length=256,
        description="vLLM's chat request: the messages rendered by the model's chat template, as the chat route "
        "renders them, then tokenized as `prompt` is",
    )
    add_special_tokens: bool = Field(
        True, description="vLLM's; textgen's tokenizers add no start or end token, so the ids are the same either way"
    )
    add_generation_prompt: bool = Field(
        True, description="with `messages`: end with the assistant's prefix, as /v1/chat/completions does"
    )
    return_token_strs: bool = Field(False, description="vLLM's: each token's text too, as `token_strs`")
    model: str | None = Field(None, description="model id; default: the active model")


class TokenizeResponse(BaseModel):
    model: str
    ids: list[int]
    tokens: list[str]  # each id's text (bytes decoded with replacement: a BPE piece may be half a character)
    count: int


class TokenizePromptResponse(BaseModel):
    """vLLM's answer to `{"prompt"}` or `{"messages"}`."""

    tokens: list[int] = Field(description="the token ids")
    count: int
    max_model_len: int = Field(
        description="how many prompt tokens the server takes, whatever they are (an LSTM has no context "
        "limit; TEXTGEN_MAX_PROMPT_CHARS over the longest token's length in characters)"
    )
    token_strs: list[str] | None = Field(None, description="each token's text, with `return_token_strs`")


class DetokenizeRequest(RequestBody):
    model_config = ConfigDict(extra="forbid")

    tokens: list[int] = Field(description="token ids of the model's tokenizer")
    model: str | None = Field(None, description="model id; default: the active model")


class DetokenizeResponse(BaseModel):
    prompt: str = Field(description="the text of the ids (U+FFFD for the unknown token)")


class TokenizerInfo(BaseModel):
    """vLLM's GET /tokenizer_info (Hugging Face's tokenizer config), for remote-tokenizer clients."""

    model: str
    tokenizer_class: str = Field(description="textgen's tokenizer class: CharTokenizer, WordTokenizer or BPETokenizer")
    kind: Literal["char", "word", "bpe"]
    vocab_size: int
    bos_token: str | None = Field(
        description="the text a generation from an empty prompt starts from (a newline), as the one token it "
        "encodes to; the first context a remote-tokenizer client gives a text it scores"
    )
    eos_token: str | None = Field(description="null: an LSTM here has no end token; generation ends at stop strings")
    pad_token: str | None = Field(description="null: batches are never padded")
    unk_token: str = Field(description="the unknown token; it decodes to U+FFFD and is not sampled by default")
    add_bos_token: bool = False
    add_eos_token: bool = False
    model_max_length: int = Field(description="as `max_model_len` of POST /tokenize")
    chat_template: str = Field(
        description="the model's chat template as Jinja (Hugging Face's variables: messages, add_generation_prompt), "
        "rendering exactly as the chat routes do"
    )
