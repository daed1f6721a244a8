"""Form posts into the API's own request types, with each problem attached to the field it is about.

Decoding into the same msgspec `Struct` the JSON endpoint takes *is* the validation, so a page accepts
exactly what the API accepts. Empty fields are left out (the type's default applies); money is typed in
dollars and converted exactly (decimal, never float) into integer micro-units.
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation
from typing import Any, TypeVar

import msgspec
from litestar import Request

from control_plane.errors import ApiError

__all__ = ["FormErrors", "FormInvalid", "decode_form", "form_values", "usd_to_micros"]

T = TypeVar("T")
_FIELD = re.compile(r"at `\$\.([a-z_]+)")
_MAX_FIELD = 10_000  # characters of one field; the body limit bounds the rest


class FormErrors(dict[str, str]):
    """{field name: message}; "" is the form as a whole."""


class FormInvalid(Exception):
    def __init__(self, errors: FormErrors) -> None:
        super().__init__("invalid form")
        self.errors = errors


async def form_values(request: Request) -> dict[str, str]:
    form = await request.form()
    return {k: str(v)[:_MAX_FIELD] for k, v in form.items() if k != "_csrf_token" and isinstance(v, str)}


def usd_to_micros(text: str, field: str) -> int:
    """"12.34" dollars → 12_340_000 micro-units, exactly; at most six decimals."""
    try:
        value = Decimal(text.strip().lstrip("$").replace(",", ""))
    except InvalidOperation:
        raise FormInvalid(FormErrors({field: "Enter an amount in dollars, like 10 or 12.50."})) from None
    micros = value * 1_000_000
    if not value.is_finite() or micros != micros.to_integral_value() or abs(micros) > 2**53 - 1:
        raise FormInvalid(FormErrors({field: "Enter an amount in dollars with at most six decimals."}))
    return int(micros)


def decode_form(values: dict[str, Any], into: type[T]) -> T:
    """`values` as an `into` (empty strings dropped, None kept: an explicit null); FormInvalid names the
    field on a problem."""
    present = {k: v for k, v in values.items() if v != ""}
    try:
        return msgspec.convert(present, into, strict=False)
    except msgspec.ValidationError as exc:
        message = str(exc)
        match = _FIELD.search(message)
        field = match.group(1) if match else ""
        text = _FIELD.sub("", message).rstrip(" -") if match else message
        raise FormInvalid(FormErrors({field: text})) from None


def api_error_field(exc: ApiError, fields: tuple[str, ...]) -> FormErrors:
    """An API error as form errors: next to the field its message starts with, else for the whole form."""
    for field in fields:
        if exc.message.startswith(field):
            return FormErrors({field: exc.message})
    return FormErrors({"": exc.message})
