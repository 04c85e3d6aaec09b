"""Per-model input rules, shared by the gateway and the simulator.

grok-image follows the reference page's validation notes exactly; other priced
models get the generic checks only (the gateway does not know their inputs).
"""

from __future__ import annotations

from typing import Any, NamedTuple

from gateway.cache import request_identity
from gateway.errors import APIError

REQUEST_TYPES = ("async", "callback")
GROK_MODES = ("text-to-image", "image-to-image")
GROK_ASPECT_RATIOS = ("1:1", "3:2", "2:3")
MAX_PROMPT_CHARS = 5000
MAX_REFERENCE_IMAGES = 1


class Submission(NamedTuple):
    """A valid submit body. A NamedTuple for the reasons store.TaskRecord is one."""

    model: str
    input: dict[str, Any]  # with defaults filled in
    provider: str
    request_type: str
    callback_url: str | None
    identity: str  # what the cache and joins key on: see cache.request_identity


def invalid(error: str) -> APIError:
    return APIError(400, error, reason="invalid")


def _validate_grok_image(raw: dict[str, Any]) -> dict[str, Any]:
    # Clients that serialise unset fields as null mean "not given": the
    # default applies, and the request's identity is that of leaving it out.
    data = {key: value for key, value in raw.items() if value is not None}
    mode = data.get("mode")
    if mode is None:
        raise invalid("Missing required field: input.mode")
    if mode not in GROK_MODES:
        raise invalid(f"input.mode must be one of {', '.join(GROK_MODES)}, got {mode!r}")
    prompt = data.get("prompt")
    if prompt is None:
        raise invalid("Missing required field: input.prompt")
    if not isinstance(prompt, str):
        raise invalid("input.prompt must be a string")
    if not prompt.strip():
        raise invalid("input.prompt must not be empty or blank")
    if len(prompt) > MAX_PROMPT_CHARS:
        raise invalid(
            f"input.prompt must not exceed {MAX_PROMPT_CHARS} characters, got {len(prompt)}"
        )
    # The reference's notes hold whenever a field is given, whatever the mode:
    # "Must be 1:1, 3:2, or 2:3 if provided"; image_urls "must be an array of
    # strings and cannot contain more than 1 image".
    ratio = data.get("aspect_ratio")
    if ratio is None and mode == "text-to-image":
        ratio = data["aspect_ratio"] = "1:1"
    if ratio is not None and ratio not in GROK_ASPECT_RATIOS:
        raise invalid(
            f"input.aspect_ratio must be one of {', '.join(GROK_ASPECT_RATIOS)}, got {ratio!r}"
        )
    urls = data.get("image_urls")
    if urls is None:
        if mode == "image-to-image":
            raise invalid("Missing required field: input.image_urls (required for image-to-image)")
        return data
    if not isinstance(urls, list) or not all(isinstance(u, str) for u in urls):
        raise invalid("input.image_urls must be an array of strings")
    if not urls and mode == "image-to-image":
        raise invalid("input.image_urls must not be empty for image-to-image")
    if len(urls) > MAX_REFERENCE_IMAGES:
        raise invalid(
            f"input.image_urls must not contain more than {MAX_REFERENCE_IMAGES} image, "
            f"got {len(urls)}"
        )
    for url in urls:
        if not url.strip().lower().startswith(("http://", "https://")):
            raise invalid(f"input.image_urls entries must be http(s) URLs, got {url!r}")
    return data


_MODEL_RULES = {"grok-image": _validate_grok_image}


def _or_default(value: Any, default: str) -> Any:
    return default if value is None else value


def validate_submit(model: str, body: Any, *, identity: str | None = None) -> Submission:
    """The submission a body asks for; `identity`, when the caller already knows
    it for these very bytes (see apixo_api.ParsedBodies), saves computing it."""
    if not isinstance(body, dict):
        raise invalid("Request body must be a JSON object")
    # An explicit null is the same as leaving the field out (see _validate_grok_image).
    request_type = _or_default(body.get("request_type"), "async")
    if request_type not in REQUEST_TYPES:
        raise invalid(
            f"request_type must be one of {', '.join(REQUEST_TYPES)}, got {request_type!r}"
        )
    callback_url = body.get("callback_url")
    if callback_url is not None and not isinstance(callback_url, str):
        raise invalid("callback_url must be a string")
    if request_type == "callback" and not callback_url:
        raise invalid(
            "Missing required field: callback_url (required when request_type is callback)"
        )
    provider = _or_default(body.get("provider"), "auto")
    if not isinstance(provider, str) or not provider.strip():
        raise invalid("provider must be a non-empty string")
    raw_input = body.get("input")
    if raw_input is None:
        raise invalid("Missing required field: input")
    if not isinstance(raw_input, dict):
        raise invalid("input must be an object")
    rule = _MODEL_RULES.get(model)
    data = rule(raw_input) if rule else dict(raw_input)
    if identity is None:
        try:
            identity = request_identity(model, data, provider)
        except RecursionError:  # orjson reads deeper nesting than the stdlib writes
            raise invalid("Request body is nested too deeply") from None
    return Submission(
        model=model,
        input=data,
        provider=provider,
        request_type=request_type,
        callback_url=callback_url if request_type == "callback" else None,
        identity=identity,
    )
