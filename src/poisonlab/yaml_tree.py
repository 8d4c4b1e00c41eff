"""Configs as YAML trees: PyYAML's safe loader without aliases or repeated keys, and with the
numbers of YAML 1.2 (the loader behind every config file, `--set` and `--grid` value)."""

from __future__ import annotations

import re
from collections.abc import Hashable
from typing import Any

import yaml


class _TreeLoader(yaml.SafeLoader):
    """Safe YAML without aliases: a config is a tree, and an alias can make it a cycle (which
    validation cannot print) or an exponential "billion laughs" expansion."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.composer.ComposerError(
                None, None, f"YAML aliases (*{event.anchor}) are not allowed in a config",
                event.start_mark)
        return super().compose_node(parent, index)

    def construct_mapping(self, node, deep=False):
        """A mapping whose key repeats is refused: YAML would keep the last value silently."""
        if isinstance(node, yaml.MappingNode):
            seen: set = set()
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=True)
                if not isinstance(key, Hashable):
                    raise yaml.constructor.ConstructorError(
                        None, None, f"a mapping key must be a name, not a "
                        f"{type(key).__name__}", key_node.start_mark)
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"the key '{key}' appears twice in one mapping",
                        key_node.start_mark)
                seen.add(key)
        return super().construct_mapping(node, deep)


# Numbers as YAML 1.2 reads them. PyYAML's YAML 1.1 reads 1e-3 as a string, 010 as the octal 8
# and 1:30 as the base-60 90: its int and float resolvers are replaced.
_INT, _FLOAT = "tag:yaml.org,2002:int", "tag:yaml.org,2002:float"
_TreeLoader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag not in (_INT, _FLOAT)]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_TreeLoader.add_implicit_resolver(
    _INT, re.compile(r"^(?:[-+]?[0-9]+|0x[0-9a-fA-F]+|0o[0-7]+)$"), list("-+0123456789"))


def _construct_int(loader: yaml.SafeLoader, node: yaml.ScalarNode) -> int:
    text = loader.construct_scalar(node)
    if text.startswith(("0x", "0o")):
        return int(text[2:], 16 if text[1] == "x" else 8)
    return int(text, 10)  # 010 is ten, as YAML 1.2 reads it (YAML 1.1: eight)


_TreeLoader.add_constructor(_INT, _construct_int)
_TreeLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                   |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
                   |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
                   |[-+]?\.(?:inf|Inf|INF)
                   |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."))


def _refuse_tag(loader: yaml.SafeLoader, node: yaml.Node) -> Any:
    raise yaml.constructor.ConstructorError(
        None, None, f"the tag {node.tag.replace('tag:yaml.org,2002:', '!!')} is not allowed in a "
        "config (it holds names, numbers, true/false and lists and mappings of them)",
        node.start_mark)


# Bytes, sets and ordered pairs are no setting's value, yet pydantic would coerce some of them
# (the bytes of `!!binary dGlueV9jbm4=` become the text "tiny_cnn"): refused by their tag.
for _tag in ("binary", "set", "omap", "pairs"):
    _TreeLoader.add_constructor(f"tag:yaml.org,2002:{_tag}", _refuse_tag)


def load_yaml_tree(text: str) -> Any:
    """Safe YAML that is a tree: no aliases, no repeated or unhashable keys (_TreeLoader)."""
    return yaml.load(text, Loader=_TreeLoader)  # noqa: S506 - a SafeLoader subclass
