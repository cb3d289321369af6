"""Every ```python block of the README and of the docs pages runs as written.

Per page, the blocks run in order in one namespace: a page's snippets continue one another.
They refer to what a user has at hand, which the prelude below provides and nothing else:
``params``, an optimizer state ``opt_state`` that has seen gradients, a
``loss_fn(params, batch)`` and ``batches``, arbitrary ``my_scores`` and a Flax ``model`` (an
``nnx.Sequential`` MLP). A renamed function or a changed signature in the library makes this
test fail until the page follows. A block that must not run is not a python block: other
spellings of a Python fence, which would escape the test, are refused.
"""

import pathlib
import re

import jax
import jax.numpy as jnp
import optax
import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
PAGES = [p for p in PAGES if "_build" not in p.parts]
BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)
# Python fences spelt otherwise, which this test would not run.
HIDDEN = re.compile(
    r"^(?:```|~~~)\s*(?:\{code-block\}|\{code\}|\{code-cell\})\s*i?py"
    r"|^(?:```|~~~)\s*(?:py|python3|pycon|ipython3?)\s*$"
    r"|^~~~\s*python",
    re.M,
)
GUIDES = sorted((ROOT / "docs" / "guides").glob("*.md"))


def _prelude() -> dict:
    from flax import nnx

    k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    params = {
        "hidden": {"kernel": jax.random.normal(k1, (64, 32)) * 0.2, "bias": jnp.zeros(32)},
        "out": {"kernel": jax.random.normal(k2, (32, 10)) * 0.2, "bias": jnp.zeros(10)},
    }
    x = jax.random.normal(k3, (384, 64))
    y = jnp.arange(384) % 10
    batches = [(x[i : i + 128], y[i : i + 128]) for i in range(0, 384, 128)]

    def loss_fn(p, batch):
        inputs, labels = batch
        h = jnp.tanh(inputs @ p["hidden"]["kernel"] + p["hidden"]["bias"])
        logits = h @ p["out"]["kernel"] + p["out"]["bias"]
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    opt = optax.adam(1e-2)
    opt_state = opt.init(params)
    for batch in batches:
        updates, opt_state = opt.update(jax.grad(loss_fn)(params, batch), opt_state, params)
        params = optax.apply_updates(params, updates)
    my_scores = jax.tree.map(jnp.abs, params)

    rngs = nnx.Rngs(0)
    model = nnx.Sequential(
        nnx.Linear(64, 32, rngs=rngs), jax.nn.relu, nnx.Linear(32, 10, rngs=rngs)
    )
    return {
        "params": params,
        "opt_state": opt_state,
        "my_scores": my_scores,
        "model": model,
        "loss_fn": loss_fn,
        "batches": batches,
    }


def _name(page: pathlib.Path) -> str:
    return str(page.relative_to(ROOT))


def test_readme_and_every_guide_have_snippets():
    assert GUIDES, "docs/guides/ holds no page"
    for page in [ROOT / "README.md", *GUIDES]:
        assert BLOCK.findall(page.read_text()), f"{_name(page)} has no python block"


@pytest.mark.parametrize("page", PAGES, ids=_name)
def test_no_python_block_escapes_the_test(page):
    hidden = HIDDEN.findall(page.read_text())
    assert not hidden, f"{_name(page)}: write Python as ```python (it runs here), else as text"


def _snippet_page(page):
    """The README's snippets run with the library suite; the docs pages' with the docs build
    (``make docs``), which is where those pages are checked."""
    marks = [] if page.name == "README.md" else [pytest.mark.docs_pages]
    return pytest.param(page, marks=marks, id=_name(page))


@pytest.mark.parametrize("page", [_snippet_page(p) for p in PAGES if BLOCK.search(p.read_text())])
def test_page_snippets_run(page, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # snippets may write files (model.fq)
    namespace = _prelude()
    for i, block in enumerate(BLOCK.findall(page.read_text()), start=1):
        try:
            exec(compile(block, f"{_name(page)} python block {i}", "exec"), namespace)
        except Exception as err:  # name the block: the traceback alone points into exec
            raise AssertionError(f"{_name(page)} python block {i} failed:\n{block}") from err
