"""The package's shape: which modules import which (no circle; the settings a leaf; the remote code flat), and the index
settings declared once, with the config, the command line and the knowledge base all taking them from there."""

import ast
import dataclasses
from pathlib import Path

import pytest

import hf_reaugkd
from hf_reaugkd import ReAugKDConfig
from hf_reaugkd.arguments import ModelArguments
from hf_reaugkd.knowledge_base import KnowledgeBase
from hf_reaugkd.modeling_reaugkd import knowledge_base_from_config
from hf_reaugkd.settings_reaugkd import INDEX_SETTINGS

PACKAGE = Path(hf_reaugkd.__file__).parent
# The modules a saved checkpoint's config names (auto_map and its custom pipeline): remote code starts there.
REMOTE_CODE_ENTRY_POINTS = ("configuration_reaugkd", "modeling_reaugkd", "pipeline_reaugkd")
# texts_sha256(encode_texts(["a movie", "été", ""])) as computed by the code of commit 388165d, before the split
PINNED_TEXTS_SHA256 = "8ad356011860d5979d57a097c247f440329b9f9cd69850bf396c533cb5686e57"


def package_imports(path: Path) -> set[str]:
    """The package modules `path` imports, at any depth of the file (function-level imports count too)."""
    module = ".".join(path.relative_to(PACKAGE).with_suffix("").parts)
    package_parts = module.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package_parts[: len(package_parts) - node.level + 1]
            if node.module:
                found.add(".".join([*base, node.module]))
            else:  # `from . import name`: each name is a module of that package (or of its __init__)
                found.update(".".join([*base, alias.name]) for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "hf_reaugkd":
            found.add(node.module.removeprefix("hf_reaugkd.") if node.module != "hf_reaugkd" else "__init__")
    return {name.removesuffix(".__init__") for name in found if name and name != module}


def import_graph() -> dict[str, set[str]]:
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        name = ".".join(path.relative_to(PACKAGE).with_suffix("").parts).removesuffix(".__init__")
        modules[name] = path
    graph = {name: set() for name in modules}
    for name, path in modules.items():
        for target in package_imports(path):
            while target not in modules and "." in target:  # `from .losses import x`: the package's __init__
                target = target.rsplit(".", 1)[0]
            if target in modules:
                graph[name].add(target)
    graph.pop("__init__", None)  # the package's lazy public names, imported on attribute access
    for edges in graph.values():
        edges.discard("__init__")
    return graph


def test_no_module_imports_itself_through_others():
    graph = import_graph()
    state: dict[str, str] = {}

    def visit(name: str, path: list[str]) -> None:
        state[name] = "open"
        for target in sorted(graph[name]):
            if state.get(target) == "open":
                pytest.fail(f"import circle: {' -> '.join([*path, name, target])}")
            if target not in state:
                visit(target, [*path, name])
        state[name] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name, [])


def test_the_settings_are_a_leaf_and_the_config_imports_nothing_else():
    graph = import_graph()
    assert graph["settings_reaugkd"] == set()
    assert graph["configuration_reaugkd"] == {"settings_reaugkd"}
    assert graph["kb_texts"] == set()


def remote_code_closure() -> set[str]:
    """Every module the entry points reach through imports: what a saved checkpoint must carry."""
    graph, seen, todo = import_graph(), set(), list(REMOTE_CODE_ENTRY_POINTS)
    while todo:
        name = todo.pop()
        if name not in seen:
            seen.add(name)
            todo.extend(graph[name])
    return seen


def test_remote_code_is_flat_and_imported_the_way_transformers_copies_it():
    """transformers copies the files a remote-code module names in `from .x import ...` (a regex over the source):
    a `from . import x`, an absolute `hf_reaugkd` import or a sub-package would leave a file behind."""
    for name in remote_code_closure():
        assert "." not in name, f"{name} is in a sub-package: remote code must be flat"
        tree = ast.parse((PACKAGE / f"{name}.py").read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level:
                assert node.level == 1 and node.module, f"{name}.py: use `from .module import name`"
            if isinstance(node, ast.ImportFrom | ast.Import):
                modules = [node.module or ""] if isinstance(node, ast.ImportFrom) else [a.name for a in node.names]
                assert all(m.split(".")[0] != "hf_reaugkd" for m in modules), f"{name}.py imports hf_reaugkd"


def test_a_saved_checkpoint_holds_exactly_the_remote_code_it_imports(tmp_path):
    from conftest import tiny_student

    tiny_student(kb_size=8).save_pretrained(tmp_path)
    saved = {path.stem for path in tmp_path.glob("*.py")}
    assert saved == remote_code_closure()
    assert saved >= {"knowledge_base", "exact_search", "faiss_index", "kb_texts", "settings_reaugkd"}
    for name in saved:  # the saved copies are the package's code, byte for byte
        assert (tmp_path / f"{name}.py").read_bytes() == (PACKAGE / f"{name}.py").read_bytes()


def test_index_settings_are_declared_once():
    config_fields = {f.name: f.default for f in dataclasses.fields(ReAugKDConfig)}
    argument_fields = {f.name: f for f in dataclasses.fields(ModelArguments)}
    for name, setting in INDEX_SETTINGS.items():
        assert config_fields[name] == setting.default
        assert argument_fields[name].default == setting.default
        assert argument_fields[name].metadata["help"] == setting.help
    assert KnowledgeBase(1, 4, 2).index_params == {name: s.default for name, s in INDEX_SETTINGS.items()}
    assert set(ModelArguments().index_params) == set(INDEX_SETTINGS)


def test_every_index_setting_of_a_config_reaches_its_knowledge_base():
    changed = {
        name: ("float16" if name == "search_dtype" else setting.default + setting.low + 1)
        for name, setting in INDEX_SETTINGS.items()
    }
    config = ReAugKDConfig(encoder_config={"model_type": "bert"}, kb_dim=4, num_labels=2, **changed)
    assert knowledge_base_from_config(config).index_params == changed


def test_every_index_flag_reaches_the_knowledge_base_settings():
    from hf_reaugkd.arguments import parse_args

    flags = [
        f"--{name}={'int8' if name == 'search_dtype' else INDEX_SETTINGS[name].default + 1}" for name in INDEX_SETTINGS
    ]
    model_args = next(a for a in parse_args(["--output_dir", "out", *flags]) if isinstance(a, ModelArguments))
    assert model_args.index_params == {
        name: ("int8" if name == "search_dtype" else s.default + 1) for name, s in INDEX_SETTINGS.items()
    }


def test_the_texts_digest_is_the_one_saved_checkpoints_record():
    """`kb_texts_sha256` in every saved config was computed this way: the digest of these texts must never change."""
    from hf_reaugkd.kb_texts import encode_texts, texts_sha256

    digest = texts_sha256(encode_texts(["a movie", "été", ""]))
    assert digest == PINNED_TEXTS_SHA256
