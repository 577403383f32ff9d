"""Kubernetes value syntax, checked before anything is written: quantities, names, labels, taints.

The rules are the API server's own (apimachinery's ``ParseQuantity``,
``IsQualifiedName``, ``IsValidLabelValue``, ``IsDNS1123Subdomain`` and the core
API's resource-name rules), so a value refused here would be refused by the
cluster too — only here it is refused with one line naming the option, before a
batch exists. Pure and light: the CLI's option types import it.
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation

from ..errors import UsageError

_QUANTITY = re.compile(
    r"^(?P<number>[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+))(?P<suffix>Ki|Mi|Gi|Ti|Pi|Ei|m|k|M|G|T|P|E|[eE][+-]?[0-9]+)?$"
)
_MULTIPLIERS = {
    None: Decimal(1), "m": Decimal("0.001"), "k": Decimal(10) ** 3, "M": Decimal(10) ** 6, "G": Decimal(10) ** 9,
    "T": Decimal(10) ** 12, "P": Decimal(10) ** 15, "E": Decimal(10) ** 18, "Ki": Decimal(2) ** 10,
    "Mi": Decimal(2) ** 20, "Gi": Decimal(2) ** 30, "Ti": Decimal(2) ** 40, "Pi": Decimal(2) ** 50,
    "Ei": Decimal(2) ** 60,
}  # fmt: skip
_NAME_PART = re.compile(r"^([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]$")
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
#: Taint effects a toleration can name (kubectl's ``key[=value]:Effect``).
EFFECTS = ("NoSchedule", "PreferNoSchedule", "NoExecute")
#: Resource names of the core API a container may request besides extended ones (``hugepages-<size>`` too).
STANDARD_RESOURCES = ("cpu", "memory", "ephemeral-storage")
#: Longest quantity string accepted (the API's are far shorter; this keeps error lines short).
_MAX_QUANTITY_TEXT = 40


def _show(value: object) -> str:
    return f"{str(value)!r:.60}"


def parse_quantity(text: str, what: str = "quantity") -> Decimal:
    """The value of a Kubernetes quantity (``500m`` -> 0.5, ``1Gi`` -> 1073741824); UsageError if malformed."""
    match = _QUANTITY.match(text) if isinstance(text, str) and len(text) <= _MAX_QUANTITY_TEXT else None
    if not match:
        raise UsageError(
            f"{what} {_show(text)} is not a Kubernetes quantity (a number with an optional suffix: "
            "m, k, M, G, T, P, E, Ki, Mi, Gi, Ti, Pi, Ei or an exponent, e.g. 500m, 2, 1.5Gi)"
        )
    suffix = match.group("suffix")
    try:
        if suffix and suffix[0] in "eE":
            return Decimal(match.group("number")) * Decimal(10) ** int(suffix[1:])
        return Decimal(match.group("number")) * _MULTIPLIERS[suffix]
    except (InvalidOperation, OverflowError, ValueError):
        raise UsageError(f"{what} {_show(text)} is out of range") from None


def positive_quantity(text: str, what: str, *, whole: bool = False) -> str:
    """``text`` if it is a quantity above 0 (a whole number with ``whole``); else UsageError naming ``what``."""
    value = parse_quantity(text, what)
    if value <= 0:
        raise UsageError(f"{what} {_show(text)} must be above 0")
    if whole and value != value.to_integral_value():
        raise UsageError(f"{what} {_show(text)} must be a whole number (extended resources cannot be fractions)")
    return text


def qualified_name(text: str, what: str) -> str:
    """``text`` if it is a qualified name (``[prefix/]name``, as label keys and resource names are)."""
    prefix, slash, name = text.rpartition("/") if isinstance(text, str) else ("", "", "")
    ok = bool(name) and len(name) <= 63 and bool(_NAME_PART.match(name))
    if slash:
        ok = ok and 0 < len(prefix) <= 253 and bool(_DNS_SUBDOMAIN.match(prefix))
    if not ok:
        raise UsageError(
            f"{what} {_show(text)} is not a valid name: an optional DNS prefix and '/', then at most 63 letters, "
            "digits, '-', '_' or '.', starting and ending with a letter or digit (e.g. example.com/fpga)"
        )
    return text


def label_value(text: str, what: str) -> str:
    """``text`` if it is a valid label value (at most 63 characters, empty allowed)."""
    if not isinstance(text, str) or len(text) > 63 or (text and not _NAME_PART.match(text)):
        raise UsageError(
            f"{what} {_show(text)} is not a valid label value: at most 63 letters, digits, '-', '_' or '.', "
            "starting and ending with a letter or digit"
        )
    return text


def object_name(text: str, what: str, *, label: bool = False) -> str:
    """``text`` if it is a DNS-1123 subdomain (an object's name); with ``label``, also a label value (<= 63)."""
    limit = 63 if label else 253
    pattern = _DNS_LABEL if label and "." not in text else _DNS_SUBDOMAIN
    if not isinstance(text, str) or not 0 < len(text) <= limit or not pattern.match(text):
        raise UsageError(
            f"{what} {_show(text)} is not a valid name: at most {limit} lowercase letters, digits, '-' or '.', "
            "starting and ending with a letter or digit"
        )
    return text


def resource_name(text: str, what: str) -> str:
    """``text`` if a container may request it: ephemeral-storage, hugepages-<size>, or ``domain/name``.

    CPU and memory have their own options; names in a ``kubernetes.io`` domain are
    reserved for the core API (as the API server says).
    """
    qualified_name(text, what)
    if text in ("cpu", "memory"):
        raise UsageError(f"{what} {_show(text)}: give CPU and memory with --cpu and --memory")
    if text == "ephemeral-storage" or text.startswith("hugepages-"):
        return text
    prefix, slash, _ = text.rpartition("/")
    if not slash:
        raise UsageError(
            f"{what} {_show(text)} is not a resource a container can request: use ephemeral-storage, "
            "hugepages-<size>, or an extended resource with a domain (e.g. nvidia.com/gpu, example.com/fpga)"
        )
    if prefix == "kubernetes.io" or prefix.endswith(".kubernetes.io"):
        raise UsageError(f"{what} {_show(text)}: the kubernetes.io domain is reserved for the core API's resources")
    return text


def is_extended(name: str) -> bool:
    """True for an extended resource (``nvidia.com/gpu``): whole numbers only, requests equal to limits."""
    return "/" in name


def toleration(text: str) -> dict[str, str]:
    """A toleration from kubectl's taint syntax ``key[=value]:Effect`` (no value: operator Exists)."""
    spec, colon, effect = text.rpartition(":") if isinstance(text, str) else ("", "", "")
    if not colon or effect not in EFFECTS or not spec:
        raise UsageError(
            f"toleration {_show(text)} is not key[=value]:Effect (kubectl's taint syntax; Effect is "
            f"{', '.join(EFFECTS)}), e.g. gpu=true:NoSchedule or dedicated:NoExecute"
        )
    key, equals, value = spec.partition("=")
    qualified_name(key, "toleration key")
    if equals:
        label_value(value, "toleration value")
        return {"key": key, "operator": "Equal", "value": value, "effect": effect}
    return {"key": key, "operator": "Exists", "effect": effect}


def key_value(text: str, what: str) -> tuple[str, str]:
    """``key=value`` with a label key and a label value (for node selectors)."""
    key, equals, value = text.partition("=") if isinstance(text, str) else ("", "", "")
    if not equals:
        raise UsageError(f"{what} {_show(text)} is not key=value (e.g. cloud.example.com/pool=gpu)")
    return qualified_name(key, f"{what} key"), label_value(value, f"{what} value")


def resource_quantity(text: str) -> tuple[str, str]:
    """``NAME=QTY`` for ``--resource``: a requestable resource and a positive quantity."""
    name, equals, quantity = text.partition("=") if isinstance(text, str) else ("", "", "")
    if not equals:
        raise UsageError(
            f"resource {_show(text)} is not NAME=QUANTITY (e.g. example.com/fpga=1, ephemeral-storage=10Gi)"
        )
    resource_name(name, "resource")
    positive_quantity(quantity, f"resource {name}", whole=is_extended(name))
    return name, quantity
