"""The proxy's shape: one endpoint table, dialects chosen per attempt, no import circle. Pure checks."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import msgspec

from proxy import relay
from proxy.bounds import request_bound
from proxy.dialects.base import Dialect, rewritten
from proxy.endpoints import ENDPOINTS, Endpoint, Output, endpoint_for, match
from proxy.exchange import Exchange
from proxy.routing import Route
from tests.proxy.test_bounds import SETTINGS

PROXY = Path(__file__).resolve().parents[2] / "proxy"


def _imports(path: Path) -> set[str]:
    """The proxy modules `path` imports at run time (imports under `if TYPE_CHECKING:` are not)."""
    tree = ast.parse(path.read_text())
    found: set[str] = set()

    def visit(nodes: list[ast.stmt]) -> None:
        for node in nodes:
            if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
                continue
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("proxy"):
                found.add(node.module)
                found.update(f"{node.module}.{a.name}" for a in node.names)
            elif isinstance(node, ast.Import):
                found.update(a.name for a in node.names if a.name.startswith("proxy"))
            for field in ("body", "orelse", "finalbody", "handlers"):
                visit(getattr(node, field, []) or [])

    visit(tree.body)
    return found


def test_no_import_circle_in_proxy() -> None:
    modules = {".".join(p.relative_to(PROXY.parent).with_suffix("").parts).removesuffix(".__init__"): p
               for p in PROXY.rglob("*.py")}
    graph = {name: {m for m in _imports(path) if m in modules and m != name} for name, path in modules.items()}
    state: dict[str, int] = {}

    def walk(node: str, trail: list[str]) -> None:
        state[node] = 1
        for nxt in graph[node]:
            assert state.get(nxt) != 1, f"import circle: {' -> '.join([*trail, node, nxt])}"
            if nxt not in state:
                walk(nxt, [*trail, node])
        state[node] = 2

    for name in graph:
        if name not in state:
            walk(name, [])
    assert "proxy.app" not in graph["proxy.relay"]


def test_endpoint_paths_live_in_the_endpoint_table_only() -> None:
    # Paths in code outside proxy/endpoints.py would be facts about an endpoint kept elsewhere (`if path ==`).
    pattern = re.compile(r"""["']/v1/""")
    offenders = [str(p.relative_to(PROXY)) for p in PROXY.rglob("*.py")
                 if p.name != "endpoints.py" and any(pattern.search(line) and not line.lstrip().startswith("#")
                                                     for line in _code_lines(p))]
    assert offenders == []


def _code_lines(path: Path) -> list[str]:
    """Lines of code, without docstrings (which may name paths)."""
    tree = ast.parse(path.read_text())
    docs = {n.body[0].lineno for n in ast.walk(tree)
            if isinstance(n, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef) and n.body
            and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
    lines = path.read_text().splitlines()
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant) and node.lineno in docs:
            skip.update(range(node.lineno, (node.end_lineno or node.lineno) + 1))
    return [line for i, line in enumerate(lines, 1) if i not in skip]


def test_match_exact_and_parameter_paths() -> None:
    assert match("/v1/responses")[0].path == "/v1/responses"  # type: ignore[index]
    endpoint, param = match("/v1/responses/resp_1")  # type: ignore[misc]
    assert endpoint.path == "/v1/responses/{id}" and param == "resp_1"
    assert match("/v1/responses/a/b") is None and match("/v1/responses/") is None and match("/nope") is None
    assert len({e.path for e in ENDPOINTS}) == len(ENDPOINTS)


# ---- a new endpoint is one table entry plus one dialect module -------------------------------------------------

class ModerationBody(msgspec.Struct):
    model: str
    input: msgspec.Raw


class ModerationPassthrough(Dialect):  # what the one new dialect module would hold
    __slots__ = ()
    path = "/moderations"

    def request(self, ex: Exchange, route: Route, byok: bool) -> tuple[str, bytes]:
        return self.path, rewritten(ex, route)


def test_a_new_endpoint_is_one_entry_and_one_dialect() -> None:
    endpoint = Endpoint("/v1/moderations", relay.serve_model, body=ModerationBody, kinds=("moderation",),
                        dialects={"openai": ModerationPassthrough()})
    route = Route(id=1, model="m", provider_id=1, provider="p", api_format="openai", base_url="http://x",
                  upstream_model="omni-up", credential=None, connect_timeout_s=1, read_timeout_s=1, priority=0,
                  weight=1, status="active")
    anthropic = msgspec.structs.replace(route, api_format="anthropic")
    body = b'{"model":"omni","input":"hello"}'
    ex = Exchange.for_body(endpoint, body, "omni")
    ex.request = endpoint.decode(body)
    ex.bound = request_bound(endpoint, ex.request, body, SETTINGS)
    assert (ex.bound.output_tokens, ex.bound.forward) == (0, None)  # no Output: nothing to generate
    dialect = endpoint.dialect_for(route)
    assert dialect is not None and endpoint.dialect_for(anthropic) is None  # the relay skips such routes
    path, payload = dialect.request(ex, route, False)
    assert path == "/moderations" and msgspec.json.decode(payload)["model"] == "omni-up"
    assert dialect.answer(200, b'{"usage":{"prompt_tokens":3}}', "omni")[2] == {"usage": {"prompt_tokens": 3}}
    assert dialect.usage({"prompt_tokens": 3}).input == 3  # type: ignore[union-attr]


def test_every_model_endpoint_has_its_facts() -> None:
    for endpoint in ENDPOINTS:
        if endpoint.handler is relay.serve_model:
            assert endpoint.kinds and endpoint.dialects, endpoint.path
    chat = endpoint_for("/v1/chat/completions")
    assert isinstance(chat.output, Output) and chat.output.forward == "max_completion_tokens"
    assert endpoint_for("/v1/responses").output.forward == "max_output_tokens"  # type: ignore[union-attr]
