"""The README's Python example runs as written (on a tiny model in place of the packaged one)."""

import re
from pathlib import Path

import torch

from residlab.testing import save_tiny_model

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def _python_blocks(section: str) -> list[str]:
    body = README.split(f"## {section}\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", body, flags=re.S)


def test_pairs_to_vector_to_steered_generation(tmp_path, capsys):
    example = _python_blocks("Python")[0]
    assert len(example.strip().splitlines()) <= 8
    assert "rl.extract(" in example and "lm.steer(" in example and "lm.generate(" in example
    model_dir = save_tiny_model(tmp_path / "tiny", "qwen2")
    code = example.replace('"qwen2.5-coder-0.5b-instruct"', repr(str(model_dir)))
    assert code != example
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    printed = capsys.readouterr().out
    assert printed.strip()
    vec, lm = namespace["vec"], namespace["lm"]
    assert vec.layers == [lm.num_layers // 2] and vec.info["n_pairs"] == len(namespace["pairs"])
    assert vec.info["read"] == "mean" and not torch.equal(vec.directions[vec.layers[0]], torch.zeros(lm.hidden_size))
    plain = lm.generate(["Describe your weekend in two sentences."], max_new_tokens=30)[0].text
    assert printed.strip() != plain.strip()  # the vector steered the generation


def test_the_layer_convention_says_where_hugging_face_differs():
    conventions = README.split("### Conventions", 1)[1]
    assert "after the final norm" in conventions and '"final_norm"' in conventions
    assert "i.e. Hugging Face\n  `hidden_states[i + 1]`." not in README


def test_no_section_appears_twice():
    """A botched merge or edit that pastes a block of the README twice repeats its headings."""
    code_free = re.sub(r"```.*?```", "", README, flags=re.S)
    headings = [line for line in code_free.splitlines() if re.match(r"#{1,4} ", line)]
    repeated = {h for h in headings if headings.count(h) > 1}
    assert not repeated, f"README headings appear twice: {sorted(repeated)}"
