"""What only the llama.cpp backend needs proving, on the real embedded GGUF.

The shared contract, conversation and UI suites already run over it
(tests/cases.py). Oracles here: the server's own non-streamed ids, the
transformers engine's render of the same GGUF, a fresh session.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from engines import EngineError, MultimodalInput as MI, SamplingConfig
from engines.loading import default_gguf_path
from tests.cases import default_engine, greedy_ids, llamacpp_engine

ROOT = Path(__file__).resolve().parent.parent
GREEDY = SamplingConfig()


@pytest.fixture(scope="module")
def cpp():
    return llamacpp_engine()


def decode(session, n, sampling=GREEDY):
    out = []
    for _ in range(n):
        r = session.decode_one(sampling)
        out.append(r)
        if r.is_terminal:
            break
    return out


def test_a_reply_full_of_cjk_and_emoji_keeps_every_id(cpp):
    # The stream drops the ids of tokens that end inside a UTF-8 character; the
    # session must recover them. Oracle: the same greedy request, not streamed.
    prompt = [MI.text("你好世界。中文：你好，世界！日本語：こんにちは。表情：🎉🎉🚀🚀🌍🌍。再说一遍：你好世界。")]
    with cpp.create_session() as s:
        s.prefill(prompt)
        results = decode(s, 40)
        gen = [r.token_id for r in results if not r.is_terminal]
        text = "".join(r.text_piece for r in results)
        want = cpp.post("/completion", {"prompt": cpp.tokenize(prompt), "n_predict": len(gen), "return_tokens": True,
                                        "cache_prompt": False, **cpp._settings(GREEDY)})["tokens"]
        assert s.tokens == cpp.tokenize(prompt) + gen
    assert gen == want[: len(gen)]
    assert any(r.text_piece == "" and not r.is_terminal for r in results), "no id ended inside a character"
    assert any(ord(ch) > 0x2000 for ch in text), text
    assert "\ufffd" not in text and text == cpp.decode(gen)


def test_a_seek_reuses_the_servers_cached_prefix(cpp):
    prompt = cpp.render([{"role": "user", "content": "Name three rivers."}])
    with cpp.create_session() as s:
        s.prefill(prompt)
        n = s.position
        assert s.last_cached == 0 or s.last_cached is None or s.last_cached < n
        decode(s, 10)
        s.seek(n + 4)
        s.next_logprobs(1)  # asks the server for the pending distribution at n + 4
        assert s.last_cached >= n + 4 - 1  # only the last kept token is evaluated again
        s.prefill([MI.text(" And one more:")])
        assert s.last_cached >= n + 4 - 1



def test_a_closed_sessions_slot_is_reusable_at_once_and_holds_nothing_wrong(cpp):
    x = cpp.render([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name three rivers."}])
    y = cpp.render([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a mountain."}])
    with cpp.create_session() as ref:  # the oracle: a slot that never held x
        ref.prefill(y)
        want = greedy_ids(ref, 12)
    a = cpp.create_session()
    a.prefill(x)
    decode(a, 20)  # its stream may still be running when it closes
    slot = a.slot
    a.close()
    with cpp.create_session() as b:
        assert b.slot == slot
        b.prefill(y)
        shared = next(i for i, (p, q) in enumerate(zip(cpp.tokenize(x), cpp.tokenize(y))) if p != q)
        assert b.last_cached is not None and b.last_cached <= shared  # only the exact common prefix
        assert b.tokens == cpp.tokenize(y)
        assert greedy_ids(b, 12) == want

TEMPLATES = {
    "own": None,
    "llama3": (
        "{{ bos_token }}{% for m in messages %}{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\n\n'"
        " + m['content'] | trim + '<|eot_id|>' }}{% endfor %}{% if add_generation_prompt %}"
        "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
    ),
    "mistral": (
        "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}{{ '[INST] ' + m['content'] + ' [/INST]' }}"
        "{% elif m['role'] == 'assistant' %}{{ m['content'] + eos_token }}{% else %}{{ m['content'] + '\n\n' }}"
        "{% endif %}{% endfor %}"
    ),
    "tojson-and-namespace": (
        "{% set ns = namespace(n=0) %}{% for m in messages %}{% set ns.n = ns.n + 1 %}"
        "{{ m['role'] | upper }} {{ m['content'] | tojson }}\n{% endfor %}{{ ns.n }}"
        "{% if add_generation_prompt %}ASSISTANT{% endif %}"
    ),
}


@pytest.mark.parametrize("name", list(TEMPLATES))
def test_templates_render_and_tokenize_as_transformers_does(cpp, name):
    hf = default_engine()
    messages = [
        {"role": "system", "content": "Be <b>brief</b> & kind."},
        {"role": "user", "content": "Hi! 你好 🎉"},
        {"role": "assistant", "content": "Hello.", "token_ids": hf.tokenize([MI.text("Hello.")])},
        {"role": "user", "content": "  Bye  "},
    ]
    for gen in (True, False):
        got = cpp.render(messages, add_generation_prompt=gen, chat_template=TEMPLATES[name])
        want = hf.render(messages, add_generation_prompt=gen, chat_template=TEMPLATES[name])
        assert got == want
        assert cpp.tokenize(got) == hf.tokenize(want)


CORRUPT_SCRIPT = r"""
import json, sys
from engines import EngineError, load_engine
out = {}
for path in sys.argv[1:]:
    try:
        load_engine(path, backend="llama.cpp", max_context=256, max_sessions=1)
        out[path] = "loaded"
    except EngineError as e:
        out[path] = "EngineError: " + str(e)
    except Exception as e:
        out[path] = "other: " + repr(e)
print(json.dumps(out))
"""


def test_corrupt_gguf_files_give_a_clear_engine_error_and_no_crash(tmp_path):
    good = default_gguf_path().read_bytes()
    arch = good.index(b"llama", 0, 4096)
    files = {
        "empty": b"",
        "not-gguf": b"hello, this is not a model\n" * 100,
        "header-only": good[:100],
        "half": good[: len(good) // 2],
        "last-byte-missing": good[:-1],
        "bad-version": good[:4] + (99).to_bytes(4, "little") + good[8:],
        "huge-key-count": good[:16] + (2**40).to_bytes(8, "little") + good[24:],
        "unknown-architecture": good[:arch] + b"zzzzz" + good[arch + 5 :],
    }
    paths = []
    for name, data in files.items():
        p = tmp_path / f"{name}.gguf"
        p.write_bytes(data)
        paths.append(str(p))
    run = subprocess.run([sys.executable, "-c", CORRUPT_SCRIPT, *paths], cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    results = json.loads(run.stdout.strip().splitlines()[-1])
    for path, outcome in results.items():
        name = Path(path).stem
        assert outcome.startswith("EngineError: "), f"{name}: {outcome}"
        assert Path(path).name in outcome or "llama.cpp could not load" in outcome, f"{name}: {outcome}"
    assert "truncated" in results[paths[3]] and "not a GGUF" in results[paths[1]]


def test_the_llamacpp_path_imports_neither_torch_nor_transformers():
    code = ("import sys; from engines import load_engine, MultimodalInput as MI, SamplingConfig;"
            "e = load_engine('smollm2', max_context=256, max_sessions=1);"
            "s = e.create_session(); s.prefill(e.render([{'role': 'user', 'content': 'Hi'}]));"
            "s.decode_one(SamplingConfig()); s.close();"
            "print(e.backend, 'torch' in sys.modules, 'transformers' in sys.modules)")
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.split()[-3:] == ["llama.cpp", "False", "False"]


def test_exit_with_a_stream_still_running_is_clean():
    # A thread left inside llama.cpp's handle_completions at exit aborts the process.
    code = ("from engines import load_engine, SamplingConfig;"
            "e = load_engine('smollm2', max_context=512, max_sessions=1); s = e.create_session();"
            "s.prefill(e.render([{'role': 'user', 'content': 'Tell me a long story.'}]));"
            "s.decode_one(SamplingConfig(temperature=1.0, seed=1)); print('left running')")
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and "left running" in run.stdout, run.stderr[-2000:]
    assert "FATAL" not in run.stderr and "terminate called" not in run.stderr


def test_four_sessions_decode_in_one_batch_and_equal_their_solo_runs(cpp):
    questions = ["Name a fruit.", "Name a colour.", "Name a city.", "Name an animal."]
    prompts = [cpp.render([{"role": "user", "content": q}]) for q in questions]
    solo = []
    for p in prompts:
        with cpp.create_session() as s:
            s.prefill(p)
            solo.append(greedy_ids(s, 24))
    sessions = [cpp.create_session() for _ in prompts]
    got: list = [None] * 4
    busy_seen = []
    done = threading.Event()

    def watch():  # how many slots llama.cpp is working on at once
        while not done.is_set():
            slots = cpp.get("/slots")
            busy_seen.append(sum(1 for sl in slots if sl.get("is_processing")))
            time.sleep(0.01)

    try:
        for s, p in zip(sessions, prompts):
            s.prefill(p)
        watcher = threading.Thread(target=watch)
        watcher.start()
        workers = [threading.Thread(target=lambda k=k: got.__setitem__(k, greedy_ids(sessions[k], 24)))
                   for k in range(4)]
        for w in workers:
            w.start()
        for w in workers:
            w.join(120)
        done.set()
        watcher.join()
    finally:
        for s in sessions:
            s.close()
    assert got == solo
    assert max(busy_seen) >= 2, f"slots busy at once: {sorted(set(busy_seen))}"


def test_a_seed_reproduces_a_reply_including_one_resumed_after_stop(cpp):
    prompt = cpp.render([{"role": "user", "content": "Write a short poem about rain."}])
    hot = SamplingConfig(temperature=0.9, top_p=0.95, seed=1234)

    def run(stop_after=None):
        with cpp.create_session() as s:
            s.prefill(prompt)
            ids = []
            for i in range(30):
                if i == stop_after:
                    s.stop()
                    assert s.decode_one(hot).is_terminal
                r = s.decode_one(hot)
                if r.is_terminal:
                    break
                ids.append(r.token_id)
            return ids

    assert run() == run()
    assert run(stop_after=7) == run(stop_after=7)
    other = [SamplingConfig(temperature=0.9, top_p=0.95, seed=99)]
    with cpp.create_session() as s:
        s.prefill(prompt)
        assert [r.token_id for r in decode(s, 30, other[0])] != run()[:30]


def test_fork_shares_the_prefix_and_decodes_like_the_original(cpp):
    prompt = cpp.render([{"role": "user", "content": "What is two plus two?"}])
    with cpp.create_session() as a:
        a.prefill(prompt)
        with a.fork() as b:
            assert b.tokens == a.tokens
            assert b.next_logprobs(3) == a.next_logprobs(3)
            assert greedy_ids(b, 8) == greedy_ids(a, 8)
            assert b.last_cached is None or b.last_cached >= 0


def test_pause_stops_the_read_ahead_and_decoding_resumes_where_it_was(cpp):
    prompt = cpp.render([{"role": "user", "content": "Tell me a long story about a dragon."}])
    with cpp.create_session() as s:
        s.prefill(prompt)
        whole = greedy_ids(s, 40)
    assert len(whole) == 40, "the oracle reply must not end early"
    with cpp.create_session() as s:
        s.prefill(prompt)
        head = greedy_ids(s, 17)  # one token into the second window (16 + 32 tokens)
        s.pause()
        seen, deadline = [], time.monotonic() + 30
        while (slot := next(x for x in cpp.get("/slots") if x["id"] == s.slot))["is_processing"]:
            seen.append(slot["next_token"][0]["n_decoded"])  # tokens of the open window so far
            assert time.monotonic() < deadline, "the slot kept decoding after pause()"
            time.sleep(0.005)
        # Without pause() the window would run on to its 32nd token.
        assert max(seen, default=0) <= 8, seen
        assert s.position == len(prompt_ids := cpp.tokenize(prompt)) + 17
        assert head + greedy_ids(s, 23) == whole
        assert s.tokens == prompt_ids + whole
