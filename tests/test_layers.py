"""The import drawing (experiments/import_graph.py, from the source with ast): the library never
imports experiments/ or tests/, lard_jax has no import cycle (deferred imports count), and no test
imports another test module."""

from experiments import import_graph


def test_imports_only_downward_no_cycles_no_test_imports_a_test():
    assert import_graph.problems() == []


def test_the_checker_sees_what_it_must(tmp_path):
    g = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert import_graph.cycles(g) == [["a", "b", "c"]]
    assert import_graph.floors({"x": set(), "y": {"x"}, "z": {"x", "y"}}) == {"x": 0, "y": 1, "z": 2}
    mod = tmp_path / "m.py"
    mod.write_text("import os\n\ndef f():\n    from lard_jax import plan\n    from experiments import restore\n")
    names = import_graph.imports_of(str(mod), known={"lard_jax.plan"})
    assert {"lard_jax.plan", "experiments"} <= names
