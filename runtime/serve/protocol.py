"""Request bodies of the two APIs (OpenAI ``/v1/embeddings`` and TEI ``/embed``) parsed into one shape.

Every check names the field (``param``) and, for list elements, the index, so a client sees what to fix.
Checks that need the model (vocabulary, max length, dimension) happen in the app once the model is known.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .errors import ApiError, bad_request, too_large

INPUT_TYPES = ("document", "query")
LONG_TEXT = ("truncate", "chunk", "error")
ENCODINGS = ("float", "base64")


@dataclass(frozen=True)
class EmbedRequest:
    """What to embed, however it was asked for. ``texts`` or ``token_ids`` is set, never both."""

    model: str | None
    texts: list[str] | None
    token_ids: list[list[int]] | None
    query: bool  # prepend the manifest's query instruction
    long_text: str  # "truncate" | "chunk" | "error": what happens to a text past max_length
    encoding: str  # "float" | "base64"
    dimensions: int | None
    normalize: bool
    param: str  # name of the input field, for error messages

    def __len__(self) -> int:
        return len(self.texts if self.texts is not None else self.token_ids)  # type: ignore[arg-type]


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def parse_inputs(value: Any, param: str, max_inputs: int) -> tuple[list[str] | None, list[list[int]] | None]:
    """A string, a list of strings, a list of token ids, or a list of token-id lists (OpenAI's four forms)."""
    if isinstance(value, str):
        if not value:
            raise _empty_string(param, param)
        return [value], None
    if not isinstance(value, list):
        raise bad_request(
            f"'{param}' must be a string, a list of strings, a list of token ids or a list of token-id lists, "
            f"got {type(value).__name__}", param, "invalid_type")
    if not value:
        raise bad_request(f"'{param}' must not be empty", param, "empty_input")
    if len(value) > max_inputs:
        raise too_large(
            f"'{param}' has {len(value)} inputs, more than this server's limit of {max_inputs} per request; "
            "split it into several requests", param, "too_many_inputs")
    first = value[0]
    if isinstance(first, str):
        for i, v in enumerate(value):
            if not isinstance(v, str):
                raise bad_request(f"'{param}[{i}]' is {type(v).__name__}; every element must be a string",
                                  param, "invalid_type")
            if not v:
                raise _empty_string(f"{param}[{i}]", param)
        return value, None
    if _is_int(first):
        for i, v in enumerate(value):
            if not _is_int(v):
                raise bad_request(f"'{param}[{i}]' is {type(v).__name__}; a token-id list holds only integers",
                                  param, "invalid_type")
        return None, [value]
    if isinstance(first, list):
        for i, row in enumerate(value):
            if not isinstance(row, list) or not row:
                raise bad_request(f"'{param}[{i}]' must be a non-empty list of token ids", param, "invalid_type")
            for j, v in enumerate(row):
                if not _is_int(v):
                    raise bad_request(f"'{param}[{i}][{j}]' is {type(v).__name__}; token ids are integers",
                                      param, "invalid_type")
        return None, value
    raise bad_request(f"'{param}[0]' is {type(first).__name__}; expected a string, an integer token id or a "
                      "list of token ids", param, "invalid_type")


def _empty_string(where: str, param: str) -> ApiError:
    # OpenAI's API refuses empty strings too; an empty text has no content for the model to embed (its vector
    # would be the special tokens' alone), so an index built on it matches nothing in particular
    return bad_request(f"'{where}' is an empty string; drop it, or send a placeholder text if you need a vector in "
                       "its place", param, "empty_string")


def _optional(body: dict, key: str, kind: type | tuple[type, ...], what: str) -> Any:
    value = body.get(key)
    if value is not None and (not isinstance(value, kind) or isinstance(value, bool) and kind is int):
        raise bad_request(f"'{key}' must be {what}, got {type(value).__name__}", key, "invalid_type")
    return value


def _long_text(body: dict, truncate: bool | None, default_truncate: bool) -> str:
    """``long_text`` wins; else ``truncate`` true/false means "truncate"/"error"."""
    mode = _optional(body, "long_text", str, '"truncate", "chunk" or "error"')
    if mode is not None:
        if mode not in LONG_TEXT:
            raise bad_request(f"'long_text' must be one of {list(LONG_TEXT)}, got {mode!r}", "long_text")
        return mode
    return "truncate" if (default_truncate if truncate is None else truncate) else "error"


def parse_openai(body: Any, max_inputs: int) -> EmbedRequest:
    """OpenAI's embeddings body, plus the extensions ``input_type`` ("query"/"document"), ``truncate``
    (default true) and ``long_text`` ("truncate"/"chunk"/"error", as ``Embedder.embed``)."""
    if not isinstance(body, dict):
        raise bad_request("the request body must be a JSON object", None, "invalid_json")
    if "input" not in body:
        raise bad_request("'input' is required", "input", "missing_field")
    texts, ids = parse_inputs(body["input"], "input", max_inputs)
    model = _optional(body, "model", str, "a string")
    encoding = parse_encoding(body)
    input_type = _optional(body, "input_type", str, '"query" or "document"') or "document"
    if input_type not in INPUT_TYPES:
        raise bad_request(f"'input_type' must be one of {list(INPUT_TYPES)}, got {input_type!r}", "input_type")
    dimensions = _optional(body, "dimensions", int, "an integer")
    truncate = _optional(body, "truncate", bool, "a boolean")
    return EmbedRequest(model=model, texts=texts, token_ids=ids, query=input_type == "query",
                        long_text=_long_text(body, truncate, True), encoding=encoding,
                        dimensions=dimensions, normalize=True, param="input")


def parse_tei(body: Any, max_inputs: int) -> EmbedRequest:
    """text-embeddings-inference's ``/embed`` body: ``inputs``, ``truncate`` (default false, as in TEI),
    ``normalize``, ``prompt_name`` ("query"), ``truncation_direction`` ("right"), ``dimensions`` (checked as on
    ``/v1/embeddings``); ``model`` and ``long_text`` as extensions."""
    if not isinstance(body, dict):
        raise bad_request("the request body must be a JSON object", None, "invalid_json")
    if "inputs" not in body:
        raise bad_request("'inputs' is required", "inputs", "missing_field")
    texts, ids = parse_inputs(body["inputs"], "inputs", max_inputs)
    truncate = _optional(body, "truncate", bool, "a boolean")
    normalize = _optional(body, "normalize", bool, "a boolean")
    prompt_name = _optional(body, "prompt_name", str, "a string")
    if prompt_name not in (None, "query"):
        raise bad_request(f"'prompt_name' {prompt_name!r} is not defined; this server knows only \"query\" (the "
                          "model's query instruction)", "prompt_name", "unknown_prompt")
    dimensions = _optional(body, "dimensions", int, "an integer")
    direction = _optional(body, "truncation_direction", str, '"right"')
    if direction is not None and direction.lower() != "right":
        raise bad_request(f"'truncation_direction' {direction!r} is not supported; only \"right\" (keep the "
                          "first tokens)", "truncation_direction")
    return EmbedRequest(model=_optional(body, "model", str, "a string"), texts=texts, token_ids=ids,
                        query=prompt_name == "query", long_text=_long_text(body, truncate, False), encoding="float",
                        dimensions=dimensions, normalize=True if normalize is None else normalize, param="inputs")


M3_FLAGS = ("return_dense", "return_sparse", "return_colbert_vecs")
M3_KEYS = (*M3_FLAGS, "encoding_format")  # the keys bge-m3 routes read beside TEI's body


def parse_encoding(body: Any) -> str:
    """``encoding_format`` on the bge-m3 routes (an extension there): ``"float"`` (default) or ``"base64"``, one
    string per text of its little-endian float32 rows (a ColBERT matrix is 1024 floats a token: base64 is about
    a third of the JSON and far cheaper to write and parse)."""
    encoding = _optional(body, "encoding_format", str, '"float" or "base64"') or "float"
    if encoding not in ENCODINGS:
        raise bad_request(f"'encoding_format' must be one of {list(ENCODINGS)}, got {encoding!r}", "encoding_format")
    return encoding


def parse_m3_outputs(body: Any) -> tuple[bool, bool, bool]:
    """``/encode``'s choice of bge-m3 outputs, named as BGEM3FlagModel.encode names them (dense by default)."""
    if not isinstance(body, dict):
        raise bad_request("the request body must be a JSON object", None, "invalid_json")
    dense, sparse, colbert = (_optional(body, k, bool, "a boolean") for k in M3_FLAGS)
    want = (True if dense is None else dense, bool(sparse), bool(colbert))
    if not any(want):
        raise bad_request("ask for at least one output: return_dense, return_sparse or return_colbert_vecs",
                          "return_dense")
    return want


@dataclass(frozen=True)
class RerankRequest:
    """A query and the passages to score against it, however it was asked for (TEI or Cohere/Jina)."""

    model: str | None
    query: str
    texts: list[str]
    top_n: int | None
    raw_scores: bool  # logits (True) or their sigmoid
    return_text: bool
    truncate: bool  # cut a pair past max length (passage side) or refuse it
    param: str  # name of the passages field, for error messages


def _passages(value: Any, param: str, max_inputs: int) -> list[str]:
    """A list of strings, or of ``{"text": str}`` objects (Cohere's and Jina's document form)."""
    if not isinstance(value, list):
        raise bad_request(f"'{param}' must be a list of strings, got {type(value).__name__}", param, "invalid_type")
    if not value:
        raise bad_request(f"'{param}' must not be empty: there is nothing to rank", param, "empty_input")
    if len(value) > max_inputs:
        raise too_large(f"'{param}' has {len(value)} passages, more than this server's limit of {max_inputs} per "
                        "request; split it into several requests", param, "too_many_inputs")
    out = []
    for i, v in enumerate(value):
        if isinstance(v, dict) and isinstance(v.get("text"), str):
            v = v["text"]
        if not isinstance(v, str):
            raise bad_request(f"'{param}[{i}]' is {type(v).__name__}; every passage must be a string or an object "
                              "with a 'text' string", param, "invalid_type")
        out.append(v)
    return out


def _query(body: dict) -> str:
    if "query" not in body:
        raise bad_request("'query' is required", "query", "missing_field")
    query = body["query"]
    if not isinstance(query, str):
        raise bad_request(f"'query' must be a string, got {type(query).__name__}", "query", "invalid_type")
    if not query:
        raise bad_request("'query' is an empty string; there is nothing to rank against", "query", "empty_string")
    return query


def _rerank(body: Any, field: str, text_flag: str, default_truncate: bool, max_inputs: int) -> RerankRequest:
    """The fields both rerank shapes share: ``query``, the passages in ``field``, ``model``, ``top_n``,
    ``raw_scores``, ``truncate`` (default per route), and the flag ``text_flag`` that echoes the passages."""
    if not isinstance(body, dict):
        raise bad_request("the request body must be a JSON object", None, "invalid_json")
    query = _query(body)
    if field not in body:
        raise bad_request(f"'{field}' is required", field, "missing_field")
    texts = _passages(body[field], field, max_inputs)
    truncate = _optional(body, "truncate", bool, "a boolean")
    return RerankRequest(model=_optional(body, "model", str, "a string"), query=query, texts=texts,
                         top_n=_top_n(body), raw_scores=bool(_optional(body, "raw_scores", bool, "a boolean")),
                         return_text=bool(_optional(body, text_flag, bool, "a boolean")),
                         truncate=default_truncate if truncate is None else truncate, param=field)


def parse_tei_rerank(body: Any, max_inputs: int) -> RerankRequest:
    """text-embeddings-inference's ``/rerank`` body: ``query``, ``texts``, ``raw_scores`` (default false: sigmoid),
    ``return_text`` (false), ``truncate`` (false, as in TEI: a pair past max length is refused),
    ``truncation_direction`` ("right"); ``model`` and ``top_n`` as extensions."""
    req = _rerank(body, "texts", "return_text", False, max_inputs)
    direction = _optional(body, "truncation_direction", str, '"right"')
    if direction is not None and direction.lower() != "right":
        raise bad_request(f"'truncation_direction' {direction!r} is not supported; only \"right\" (the passage's "
                          "end is cut)", "truncation_direction")
    return req


def parse_cohere_rerank(body: Any, max_inputs: int) -> RerankRequest:
    """Cohere's (v1 and v2) and Jina's ``/rerank`` body: ``model``, ``query``, ``documents`` (strings or
    ``{"text": ...}``), ``top_n``, ``return_documents`` (default false); scores are the sigmoid of the logit
    (``relevance_score`` in [0, 1]), ``raw_scores`` as an extension. Pairs past max length are cut on the
    passage side (Cohere truncates long documents); ``truncate: false`` refuses them instead."""
    return _rerank(body, "documents", "return_documents", True, max_inputs)


def _top_n(body: dict) -> int | None:
    top_n = _optional(body, "top_n", int, "an integer")
    if top_n is not None and top_n < 1:
        raise bad_request(f"'top_n' must be at least 1, got {top_n}", "top_n")
    return top_n
