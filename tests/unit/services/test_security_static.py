"""Static security checks of our own packages (no processes; runs in about a second).

- No unpickling of anything on a wire we own: an AST scan for pickle/marshal/dill/joblib/shelve loads,
  `np.load(..., allow_pickle=True)`, `torch.load` without `weights_only=True`, `yaml.load` without a
  safe loader, and bare `eval`/`exec`. (Ray pickles the arguments of DeploymentHandle calls inside the
  cluster; that is Ray's trusted, private network, see docs/security.md, not a wire we own.)
- The bearer-token check is constant-time.
- Redis URLs are redacted in the messages that quote them.
"""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import pytest

from tests.helpers import ROOT

PACKAGES = ["shared", "assistant_server", "services", "student_trainer", "benchmarks"]

UNSAFE_MODULE_CALLS = {
    ("pickle", "load"),
    ("pickle", "loads"),
    ("pickle", "Unpickler"),
    ("cPickle", "loads"),
    ("cloudpickle", "loads"),
    ("cloudpickle", "load"),
    ("dill", "load"),
    ("dill", "loads"),
    ("marshal", "load"),
    ("marshal", "loads"),
    ("joblib", "load"),
    ("shelve", "open"),
    ("yaml", "unsafe_load"),
    ("yaml", "full_load"),
    ("pd", "read_pickle"),
    ("pandas", "read_pickle"),
}


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return ""


def _kw(call: ast.Call, name: str) -> ast.AST | None:
    return next((k.value for k in call.keywords if k.arg == name), None)


def _is_const(node: ast.AST | None, value) -> bool:
    return isinstance(node, ast.Constant) and node.value is value


def unsafe_calls(source: str, filename: str = "<src>") -> list[str]:
    """Every call in `source` that can execute code hidden in data it reads."""
    found = []
    for node in ast.walk(ast.parse(source, filename)):
        if not isinstance(node, ast.Call):
            continue
        name = _dotted(node.func)
        parts = name.split(".")
        where = f"{filename}:{node.lineno}: {name}"
        if len(parts) >= 2 and (parts[-2], parts[-1]) in UNSAFE_MODULE_CALLS:
            found.append(where)
        elif parts[-1] == "load" and parts[0] in ("np", "numpy") and not _is_const(_kw(node, "allow_pickle"), False):
            if _kw(node, "allow_pickle") is not None:  # anything but a literal False
                found.append(where + "(allow_pickle not False)")
        elif name == "torch.load" and not _is_const(_kw(node, "weights_only"), True):
            found.append(where + "(without weights_only=True)")
        elif name == "yaml.load":
            loader = _dotted(_kw(node, "Loader") or (node.args[1] if len(node.args) > 1 else ast.Constant(None)))
            if not loader.endswith(("SafeLoader", "CSafeLoader")):
                found.append(where + "(without SafeLoader)")
        elif name in ("eval", "exec") and isinstance(node.func, ast.Name):
            found.append(where)
        elif name in ("pickle.Unpickler", "Unpickler"):
            found.append(where)
    return found


def _sources() -> list[Path]:
    files = [p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")]
    assert len(files) > 30, "the scan must see our packages"
    return files


def test_no_unpickling_in_our_packages():
    problems = [hit for path in _sources() for hit in unsafe_calls(path.read_text(), str(path.relative_to(ROOT)))]
    assert not problems, "unsafe deserialisation:\n" + "\n".join(problems)


def test_np_load_is_always_called_with_allow_pickle_false_or_default():
    """np.load defaults to allow_pickle=False, but where we call it on wire data we say so explicitly."""
    src = (ROOT / "shared" / "wire" / "arrays.py").read_text()
    calls = [n for n in ast.walk(ast.parse(src)) if isinstance(n, ast.Call) and _dotted(n.func) == "np.load"]
    assert calls and all(_is_const(_kw(c, "allow_pickle"), False) for c in calls)


@pytest.mark.parametrize(
    "snippet",
    [
        "import pickle\npickle.loads(b)",
        "import numpy as np\nnp.load(f, allow_pickle=True)",
        "import numpy as np\nnp.load(f, allow_pickle=flag)",
        "import torch\ntorch.load(p)",
        "import torch\ntorch.load(p, weights_only=False)",
        "import yaml\nyaml.load(s)",
        "import yaml\nyaml.load(s, Loader=yaml.Loader)",
        "import yaml\nyaml.unsafe_load(s)",
        "import marshal\nmarshal.loads(b)",
        "import joblib\njoblib.load(p)",
        "eval(text)",
        "import pandas as pd\npd.read_pickle(p)",
    ],
)
def test_scanner_catches_unsafe_calls(snippet):
    assert unsafe_calls(snippet), snippet


@pytest.mark.parametrize(
    "snippet",
    [
        "import numpy as np\nnp.load(f, allow_pickle=False)",
        "import numpy as np\nnp.load(f)",
        "import torch\ntorch.load(p, map_location='cpu', weights_only=True)",
        "import yaml\nyaml.safe_load(s)",
        "import yaml\nyaml.load(s, Loader=yaml.SafeLoader)",
        "model.eval()",
        "json.loads(s)",
    ],
)
def test_scanner_passes_safe_calls(snippet):
    assert not unsafe_calls(snippet), snippet


def test_bearer_token_compare_is_constant_time():
    from services.ingress.middleware import GuardMiddleware

    src = inspect.getsource(GuardMiddleware)
    assert "hmac.compare_digest(" in src
    tree = ast.parse(inspect.cleandoc("\n" + src))
    compares = [n for n in ast.walk(tree) if isinstance(n, ast.Compare)]
    for c in compares:  # no `given == token` shortcut anywhere in the guard
        names = {_dotted(x) for x in [c.left, *c.comparators]}
        assert not ({"given", "token"} <= names), ast.unparse(c)


def test_redis_urls_are_redacted():
    from shared.wire.connection import auth_error, redact

    assert redact("redis://:s3cret@h:6379/0") == "redis://:***@h:6379/0"
    assert redact("rediss://vessa:s3cret@h:6380/0?ssl_ca_certs=/x") == "rediss://vessa:***@h:6380/0?ssl_ca_certs=/x"
    assert redact("redis://h:6379/0") == "redis://h:6379/0"
    assert "s3cret" not in str(auth_error("redis://u:s3cret@h/0", RuntimeError("WRONGPASS")))
