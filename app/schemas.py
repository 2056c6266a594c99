"""Request and response bodies, named by role. Bounds live here so that the API docs show them.

Every request body is a `RequestBody` (app/bodies.py): strict types, and no NUL or lone surrogate
in its text. The native routes refuse unknown fields (a typo such as `temprature` is a 422, not a
silent default); the /v1 routes ignore them, as OpenAI-compatible servers do, because clients send
fields this service has no use for, and take null for any optional field, as OpenAI does.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, field_validator, model_validator

from app.bodies import RequestBody
from lm.sampler import MAX_STOP_STRINGS

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


# ---------------------------------------------------------------------------- native


class GenerateRequest(RequestBody):
    model_config = ConfigDict(extra="forbid")

    prompt: str = Field("", description="text to continue; empty starts from the model's start token")
    model: str | None = Field(None, description="model id; default: the active model")
    max_tokens: int = Field(200, ge=1, description="at most TEXTGEN_MAX_TOKENS")
    temperature: float = Field(1.0, ge=0, le=5, description="0 = greedy")
    top_k: int = Field(0, ge=0, description="0 = off")
    top_p: float = Field(1.0, gt=0, le=1)
    min_p: float = Field(0.0, ge=0, lt=1)
    repetition_penalty: float = Field(1.0, gt=0, le=10)
    stop: list[StopString] = Field(default_factory=list, max_length=MAX_STOP_STRINGS)
    seed: Seed | None = None
    stream: bool = False

    _stop = field_validator("stop", mode="before")(_stop_list)


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class GenerateResponse(BaseModel):
    id: str
    model: str
    text: str
    finish_reason: FinishReason
    usage: Usage


class TokenizeRequest(RequestBody):
    model_config = ConfigDict(extra="forbid")

    text: str
    model: str | None = None


class TokenizeResponse(BaseModel):
    model: str
    ids: list[int]
    tokens: list[str]  # each id's text (bytes decoded with replacement: a BPE piece may be half a character)
    count: int


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
    model: str
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
    user: str | None = Field(None, max_length=256)

    _stop = field_validator("stop", mode="before")(_stop_list)

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


class CompletionRequest(_OpenAISampling):
    prompt: str | list[str] = ""
    logprobs: int | None = Field(None, ge=0, le=5)
    echo: bool = False

    @field_validator("prompt")
    @classmethod
    def _prompt_list(cls, value: str | list[str]) -> str | list[str]:
        if isinstance(value, list) and not 1 <= len(value) <= 8:
            raise ValueError("a prompt list holds 1 to 8 strings")
        return value

    @property
    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)


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
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]]
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


class ModelObjectList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelObject]
