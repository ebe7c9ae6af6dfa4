"""The host contracts: which names of a web UI our adapters use, and checks of a pin of them.

Two web UIs, two pins: ``tests/host_contract.json`` for the AUTOMATIC1111 web UI 1.10 (what
``dreambooth/host/webui.py`` and ``host/a1111.py`` use) and ``tests/forge_contract.json`` for Forge (what
``host/webui.py`` and ``host/forge.py`` use: ``modules.*``, ``modules_forge.*``, ``backend.*``). A pin holds every
name with its kind (and a function's signature, as ``inspect`` writes it). Three checks use this module:

- :func:`used_names` reads the adapters with ``ast`` and lists every chain rooted at a web UI import they use
  (resolved through the pin's ``instance`` entries: ``shared.state.begin`` → ``modules.shared_state.State.begin``)
  with each call's arguments, so the pin cannot drift from the code;
- :func:`check_source` checks the pin against a web UI's source tree, statically;
- :func:`check_import_script` is run by the web UI's own Python to check the pin against the imported modules.
"""

from __future__ import annotations

import ast
import json
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
HOST = REPO / "dreambooth" / "host"
A1111 = HOST / "a1111.py"
FORGE = HOST / "forge.py"
COMMON = HOST / "webui.py"
PIN = Path(__file__).with_name("host_contract.json")
FORGE_PIN = Path(__file__).with_name("forge_contract.json")
CONTRACTS = {"a1111": (PIN, (COMMON, A1111)), "forge": (FORGE_PIN, (COMMON, FORGE))}
"""Each web UI's pin and the adapter files whose names it holds."""
WEBUI_ROOTS = ("modules", "modules_forge", "backend")
"""Top-level packages of the web UIs (Forge adds the last two)."""
STOP_KINDS = {"value", "attribute", "option", "flag", "function"}
BINDING_KINDS = {"value", "instance", "namespace"}


def load_pin(pin: Path = PIN) -> dict[str, dict]:
    """The pinned names: ``{"modules.x.y": {"kind": ..., ...}}``."""
    return json.loads(Path(pin).read_text(encoding="utf-8"))["names"]


def is_forge(webui: Path) -> bool:
    """Whether the checkout at ``webui`` is Forge: it has the ``modules_forge`` package beside ``modules``."""
    return (Path(webui) / "modules_forge" / "__init__.py").is_file() or (Path(webui) / "modules_forge").is_dir()


def used_names_of(contract: str) -> list[Use]:
    """Every web UI name the adapter files of one contract (``"a1111"`` or ``"forge"``) use, resolved."""
    pin_path, sources = CONTRACTS[contract]
    pin = load_pin(pin_path)
    return [use for source in sources for use in used_names(pin, source)]


@dataclass
class Use:
    """One chain of attributes rooted at a ``modules`` import, as written in a1111.py."""

    chain: str
    line: int
    call: ast.Call | None = None
    resolved: str | None = None
    visited: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


def used_names(pin: dict[str, dict], source: Path = A1111) -> list[Use]:
    """Every chain rooted at a web UI import (``modules``, ``modules_forge``, ``backend``) in ``source``, resolved
    against the pin (unresolvable ones carry problems)."""
    tree = ast.parse(source.read_text(encoding="utf-8"))
    roots: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in WEBUI_ROOTS \
                and node.level == 0:
            for alias in node.names:
                roots[alias.asname or alias.name] = f"{node.module}.{alias.name}"
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] in WEBUI_ROOTS:
                    roots[alias.asname or alias.name] = alias.name
    parents = {child: parent for parent in ast.walk(tree) for child in ast.iter_child_nodes(parent)}
    uses = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Attribute) or isinstance(parents.get(node), ast.Attribute):
            continue
        parts, inner = [], node
        while isinstance(inner, ast.Attribute):
            parts.append(inner.attr)
            inner = inner.value
        if not isinstance(inner, ast.Name) or inner.id not in roots:
            continue
        parent = parents.get(node)
        call = parent if isinstance(parent, ast.Call) and parent.func is node else None
        use = Use(".".join([roots[inner.id], *reversed(parts)]), node.lineno, call)
        _resolve(use, pin)
        uses.append(use)
    return uses


def _resolve(use: Use, pin: dict[str, dict]) -> None:
    segments = use.chain.split(".")
    current = ".".join(segments[:3])
    rest = segments[3:]
    while True:
        entry = pin.get(current)
        if entry is None:
            use.problems.append(f"{current} (from {use.chain}, line {use.line}) is not pinned")
            return
        use.visited.append(current)
        if entry["kind"] == "namespace":
            if not rest:
                break
            current, rest = f"{current}.{rest[0]}", rest[1:]
            continue
        if entry["kind"] == "instance":
            base = entry["of"]
            if not rest:
                break
            current, rest = f"{base}.{rest[0]}", rest[1:]
            continue
        if entry["kind"] in STOP_KINDS:
            if entry["kind"] == "function" and use.call is not None and not rest:
                use.problems += _check_call(current, entry, use)
            break
        use.problems.append(f"{current} has an unknown kind {entry['kind']!r}")
        return
    use.resolved = current


def _check_call(name: str, entry: dict, use: Use) -> list[str]:
    """The call's arguments must fit the pinned signature (``self`` of a method is bound already)."""
    args = ast.parse(f"def f{entry['signature']}: pass").body[0].args
    positional = [a.arg for a in [*args.posonlyargs, *args.args]]
    if entry.get("method"):
        positional = positional[1:]
    call = use.call
    assert call is not None
    problems = []
    if any(isinstance(a, ast.Starred) for a in call.args) or any(k.arg is None for k in call.keywords):
        return [f"{name} (line {use.line}) is called with *args/**kwargs: the contract cannot check it"]
    if len(call.args) > len(positional) and args.vararg is None:
        problems.append(f"{name} (line {use.line}) gets {len(call.args)} positional arguments; "
                        f"the host takes {len(positional)}")
    names = set(positional) | {a.arg for a in args.kwonlyargs}
    for keyword in call.keywords:
        if keyword.arg not in names and args.kwarg is None:
            problems.append(f"{name} (line {use.line}) has no parameter {keyword.arg!r}")
    required = positional[:len(positional) - len(args.defaults)]
    given = set(positional[:len(call.args)]) | {k.arg for k in call.keywords}
    required_kw = [a.arg for a, d in zip(args.kwonlyargs, args.kw_defaults) if d is None]
    for missing in [p for p in required if p not in given] + [k for k in required_kw if k not in given]:
        problems.append(f"{name} (line {use.line}) is called without the required {missing!r}")
    return problems


# ---- the pin against a web UI's source tree ----------------------------------------------------------------

def check_source(webui: Path, pin: dict[str, dict]) -> list[str]:
    """Problems of the pin against the source tree at ``webui`` (empty when every name is there as pinned)."""
    problems = []
    for name, entry in pin.items():
        problem = _check_one(webui, name, entry)
        if problem:
            problems.append(f"{name}: {problem}")
    return problems


def _module_tree(webui: Path, module: str) -> ast.Module | None:
    path = webui / Path(*module.split(".")).with_suffix(".py")
    return ast.parse(path.read_text(encoding="utf-8")) if path.is_file() else None


def _split(webui: Path, name: str) -> tuple[str, list[str]]:
    """``modules.shared_state.State.begin`` → (``modules.shared_state``, [``State``, ``begin``])."""
    parts = name.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        module = ".".join(parts[:cut])
        if (webui / Path(*module.split(".")).with_suffix(".py")).is_file():
            return module, parts[cut:]
    raise LookupError(f"no module file for {name}")


def _targets(node: ast.AST) -> list[ast.expr]:
    if isinstance(node, ast.Assign):
        return node.targets
    return [node.target] if isinstance(node, ast.AnnAssign) else []


def _top_level(tree: ast.Module, name: str) -> ast.AST | None:
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and node.name == name:
            return node
        targets = _targets(node)
        if any(isinstance(t, ast.Name) and t.id == name for t in targets):
            return node
        if isinstance(node, (ast.Import, ast.ImportFrom)) and any((a.asname or a.name) == name for a in node.names):
            return node
    return None


def _class_member(cls: ast.ClassDef, name: str) -> ast.AST | None:
    for node in cls.body:
        if isinstance(node, ast.FunctionDef) and node.name == name:
            return node
        targets = _targets(node)
        if any(isinstance(t, ast.Name) and t.id == name for t in targets):
            return node
    for node in ast.walk(cls):
        if (isinstance(node, ast.Attribute) and node.attr == name and isinstance(node.value, ast.Name)
                and node.value.id == "self" and isinstance(node.ctx, ast.Store)):
            return node
    return None


def signature_of(function: ast.FunctionDef) -> str:
    """The signature as ``str(inspect.signature(f))`` writes it for simple defaults."""
    return f"({ast.unparse(function.args)})"


def same_signature(a: str, b: str) -> bool:
    """Equal but for spacing (``inspect`` writes ``x: int = 1`` where ``ast`` writes ``x: int=1``)."""
    return "".join(a.split()) == "".join(b.split())


def _check_one(webui: Path, name: str, entry: dict) -> str | None:
    kind = entry["kind"]
    if kind == "option":
        text = (webui / "modules" / "shared_options.py").read_text(encoding="utf-8")
        key = name.rsplit(".", 1)[1]
        return None if f'"{key}": OptionInfo(' in text else "no such option in modules/shared_options.py"
    if kind == "flag":
        text = (webui / "modules" / "cmd_args.py").read_text(encoding="utf-8")
        flag = "--" + name.rsplit(".", 1)[1].replace("_", "-")
        return None if f'"{flag}"' in text else f"no {flag} in modules/cmd_args.py"
    where = entry.get("at", name)
    try:
        module, path = _split(webui, name)
    except LookupError as exc:
        return str(exc)
    tree = _module_tree(webui, module)
    assert tree is not None
    node: ast.AST | None = _top_level(tree, path[0])
    for part in path[1:]:
        node = _class_member(node, part) if isinstance(node, ast.ClassDef) else None
    if node is None:
        return f"not defined in {module}"
    if kind == "instance":
        target_module, target_path = _split(webui, entry["of"])
        target = _module_tree(webui, target_module)
        if target is None or not isinstance(_top_level(target, target_path[0]), ast.ClassDef):
            return f"class {entry['of']} not found"
    if kind == "function":
        if where != name:
            module, path = _split(webui, where)
            tree = _module_tree(webui, module)
            node = _top_level(tree, path[0]) if tree else None
            for part in path[1:]:
                node = _class_member(node, part) if isinstance(node, ast.ClassDef) else None
        if not isinstance(node, ast.FunctionDef):
            return f"{where} is not a function"
        found = signature_of(node)
        if not same_signature(found, entry["signature"]):
            return f"signature {found}, pinned {entry['signature']}"
    return None


# ---- the pin against an imported web UI (run by the web UI's Python, in its folder) ---------------------

def check_import_script(webui: Path, pin_path: Path = PIN, args: tuple[str, ...] = ()) -> str:
    """Python source that imports the web UI's modules and prints the problems of the pin as JSON; ``args`` are
    the web UI's command-line flags (Forge without a GPU needs ``--always-cpu`` before its backend imports)."""
    return f'''
import importlib, inspect, json, os, sys
os.chdir({str(webui)!r})
sys.path.insert(0, {str(webui)!r})
sys.argv = ["webui.py", *{list(args)!r}]
os.environ.setdefault("IGNORE_CMD_ARGS_ERRORS", "1")
pin = json.loads(open({str(pin_path)!r}, encoding="utf-8").read())["names"]
problems = []

def find(name):
    parts = name.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for part in parts[cut:]:
            obj = getattr(obj, part)
        return obj
    raise LookupError(name)

from modules import initialize  # what webui.py does first: imports, then shared.opts/state exist
initialize.imports()
from modules import shared_options, shared_cmd_options
for name, entry in pin.items():
    key = name.rsplit(".", 1)[1]
    try:
        if entry["kind"] == "option":
            assert key in shared_options.options_templates, "no such option"
        elif entry["kind"] == "flag":
            assert hasattr(shared_cmd_options.cmd_opts, key), "no such flag"
        elif entry["kind"] == "attribute":
            owner = find(name.rsplit(".", 1)[0])
            assert (hasattr(owner, key) or key in getattr(owner, "__annotations__", {{}})
                    or ("self." + key + " =") in inspect.getsource(owner)), "no such attribute"
        elif entry["kind"] == "function":
            found = str(inspect.signature(find(entry.get("at", name))))
            assert "".join(found.split()) == "".join(entry["signature"].split()), "signature " + found
        elif entry["kind"] == "instance":
            module = importlib.import_module(name.rsplit(".", 1)[0])
            assert key in vars(module), "not in module"
            assert inspect.isclass(find(entry["of"])), "no class " + entry["of"]
        else:
            module = importlib.import_module(name.rsplit(".", 1)[0])
            assert key in vars(module), "not in module"
    except Exception as exc:
        problems.append(name + ": " + repr(exc))
print("CONTRACT " + json.dumps(problems))
'''
