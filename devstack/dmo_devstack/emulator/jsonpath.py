"""
The small JSONPath subset of CRD printer columns and scale subresources.

``additionalPrinterColumns[].jsonPath`` and ``scale.specReplicasPath`` use simple
paths (``.spec.replicas``, ``.status.conditions[?(@.type=="Ready")].status``); the
API server evaluates them with client-go's jsonpath, of which this is enough.
"""
from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

def get_dotted(obj: Any, dotted: str) -> Any:
    for part in dotted.split('.'):
        obj = obj.get(part) if isinstance(obj, Mapping) else None
    return obj



def eval_jsonpath(obj: Any, path: str) -> list[Any]:
    """Evaluate the simple JSONPaths of printer columns and scale subresources."""
    tokens = re.findall(r'\.([A-Za-z0-9_\-$]+)|\[(\*|\d+|\?\(@\.[^)]*\))\]|\.\[(\*)\]', path.strip())
    current = [obj]
    for key, index, star in tokens:
        nxt: list[Any] = []
        for item in current:
            if key:
                if isinstance(item, Mapping) and key in item:
                    nxt.append(item[key])
            elif index == '*' or star:
                if isinstance(item, list):
                    nxt.extend(item)
                elif isinstance(item, Mapping):
                    nxt.extend(item.values())
            elif index.isdigit():
                if isinstance(item, list) and int(index) < len(item):
                    nxt.append(item[int(index)])
            else:
                m = re.fullmatch(r'\?\(@\.([A-Za-z0-9_.\-]+)\s*(==|!=)\s*["\']?([^"\']*)["\']?\)', index)
                if not m or not isinstance(item, list):
                    continue
                for elem in item:
                    value = get_dotted(elem, m.group(1))
                    if (str(value) == m.group(3)) == (m.group(2) == '=='):
                        nxt.append(elem)
        current = nxt
    return current


def set_dotted(obj: dict[str, Any], path: str, value: Any) -> None:
    parts = [p for p in path.strip().lstrip('.').split('.') if p]
    for part in parts[:-1]:
        obj = obj.setdefault(part, {})
    obj[parts[-1]] = value
