"""One small registry per concept, keyed by readable names (timm's ``@register_model`` idea)."""
import difflib


class Registry:
    """Maps names to factories; refuses clashes and suggests close names on a miss."""

    def __init__(self, kind: str):
        self.kind, self._items = kind, {}

    def register(self, name: str):
        def decorator(fn):
            if name in self._items:
                raise KeyError(f"{self.kind} {name!r} is already registered")
            self._items[name] = fn
            return fn
        return decorator

    def get(self, name: str):
        if name not in self._items:
            raise KeyError(self.unknown_message(name))
        return self._items[name]

    def unknown_message(self, name: str) -> str:
        close = difflib.get_close_matches(name, self._items, n=3)
        hint = f" Did you mean {close}?" if close else ""
        return f"Unknown {self.kind} {name!r}.{hint} Known: {sorted(self._items)}"

    def __contains__(self, name: str) -> bool:
        return name in self._items

    def names(self) -> list[str]:
        return sorted(self._items)
