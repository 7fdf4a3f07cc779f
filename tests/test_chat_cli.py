"""``mixtral-lite chat``: a session fed through stdin (/reset, /exit, Ctrl-D, Ctrl-C), and the
conversation bookkeeping of ``ChatSession``."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from gen_fixtures import make_model_folder, one_thread  # noqa: F401 (autouse fixture)

from mixtral_lite.commands.chat import ChatSession
from mixtral_lite.errors import UserError
from mixtral_lite.generation.generate import generate
from mixtral_lite.generation.tokenizer import load_tokenizer
from mixtral_lite.weights.loading import load_model

NEW = 8


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("chat")
    make_model_folder(path, seed=0, max_position_embeddings=4096)
    return path, load_model(path), load_tokenizer(path)


def answer(model, tok, messages, n=NEW) -> str:
    """The reference: the library's greedy answer to a conversation."""
    return generate(model, tok, tok.encode_chat(messages), max_new_tokens=n, continuation=False).text


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


def chat_process(folder, *args):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONIOENCODING": "utf-8"}
    cmd = [sys.executable, "-m", "mixtral_lite", "chat", "--model", str(folder), *args]
    return subprocess.Popen(
        cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True, encoding="utf-8"
    )


def test_session_through_stdin_keeps_history_resets_and_exits(tiny):
    """Three questions: the second sees the first exchange, /reset forgets it, /exit stops reading."""
    folder, model, tok = tiny
    proc = chat_process(folder, "--max-new-tokens", str(NEW), "--system", "Be brief.")
    out, err = proc.communicate("Hello 🦙\nAnd then?\n/reset\n\nHi there\n/exit\nnever read\n", timeout=120)
    assert proc.returncode == 0, err
    system = {"role": "system", "content": "Be brief."}
    a1 = answer(model, tok, [system, user("Hello 🦙")])
    a2 = answer(model, tok, [system, user("Hello 🦙"), assistant(a1), user("And then?")])
    a3 = answer(model, tok, [system, user("Hi there")])
    assert out == f"{a1}\n{a2}\n{a3}\n"
    assert "(new conversation)" in err and "Traceback" not in err


def test_ctrl_c_stops_the_answer_and_keeps_the_session(tiny):
    """SIGINT while an answer streams: the answer stops, the chat reads the next command, Ctrl-D
    (EOF) exits 0. (That the conversation survives is checked in-process below.)"""
    folder, model, tok = tiny
    proc = chat_process(folder, "--max-new-tokens", "4000")
    proc.stdin.write("Tell me everything\n")
    proc.stdin.flush()
    first = proc.stdout.read(1)  # the answer has started streaming
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate("/reset\n", timeout=120)  # then EOF
    assert proc.returncode == 0, err
    assert "Traceback" not in err
    assert 0 <= err.index("(answer stopped)") < err.index("(new conversation)")
    assert first and out.endswith("\n")


def test_session_bookkeeping_and_interrupt(tiny):
    _, model, tok = tiny
    session = ChatSession(model, tok, system="S", max_new_tokens=NEW)
    shown = []
    a1 = session.ask("Hello", shown.append)
    assert a1 == "".join(shown) == answer(model, tok, [{"role": "system", "content": "S"}, user("Hello")])
    assert session.turns == [user("Hello"), assistant(a1)]

    def stop_after_two(piece, seen=[]):  # noqa: B006 (counts calls)
        seen.append(piece)
        if len(seen) == 3:
            raise KeyboardInterrupt

    partial = session.ask("More", stop_after_two)
    assert session.last_result is None  # interrupted
    assert len(partial) > 0 and a1 != partial
    assert session.turns[-2:] == [user("More"), assistant(partial)]  # the part shown is kept
    a3 = session.ask("Next", lambda piece: None)
    expected = answer(model, tok, [{"role": "system", "content": "S"}, *session.turns[:-2], user("Next")])
    assert a3 == expected
    session.reset()
    assert session.turns == []


def test_interrupt_before_any_text_forgets_the_question(tiny):
    _, model, tok = tiny
    session = ChatSession(model, tok, max_new_tokens=NEW)

    def stop(piece):
        raise KeyboardInterrupt

    assert session.ask("Hello", stop) == ""
    assert session.turns == []  # roles still alternate for the next question


def test_long_conversations_drop_the_oldest_turns(tmp_path):
    make_model_folder(tmp_path, seed=0, max_position_embeddings=48)
    model, tok = load_model(tmp_path), load_tokenizer(tmp_path)
    session = ChatSession(model, tok, max_new_tokens=6)
    for question in ["one two three four", "five six seven eight", "nine ten eleven", "twelve thirteen"]:
        session.ask(question, lambda piece: None)
        assert len(tok.encode_chat(session.turns[:-1])) < 48
    assert session.turns[0] != user("one two three four")  # the oldest exchange was dropped
    before = list(session.turns)
    with pytest.raises(UserError, match="longer than the model's context"):
        session.ask("word " * 60, lambda piece: None)
    assert session.turns == before  # the failed question left no trace


def test_chat_in_a_terminal_edits_lines_and_recalls_history(tiny):
    """In a pty: left-arrow editing fixes "/hlp" into "/help", up-arrow recalls it, Ctrl-D quits."""
    import pty
    import select
    import time

    folder = tiny[0]
    master, slave = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "mixtral_lite", "chat", "--model", str(folder), "--max-new-tokens", "2"],
        stdin=slave, stdout=slave, stderr=slave, cwd=Path(__file__).parent, close_fds=True,
        env={**os.environ, "TERM": "xterm", "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    os.close(slave)
    seen = b""

    def read_until(marker: bytes, timeout: float = 60) -> None:
        nonlocal seen
        end = time.monotonic() + timeout
        while marker not in seen and time.monotonic() < end:
            if select.select([master], [], [], 0.2)[0]:
                try:
                    seen += os.read(master, 4096)
                except OSError:
                    break
        assert marker in seen, seen.decode(errors="replace")

    try:
        read_until(b"> ")
        os.write(master, b"/hlp\x1b[D\x1b[De\r")  # two left arrows, insert "e"
        read_until(b"start a new conversation")
        first = seen.count(b"start a new conversation")
        os.write(master, b"\x1b[A\r")  # up arrow: the previous line, "/help"
        end = time.monotonic() + 60
        while seen.count(b"start a new conversation") <= first and time.monotonic() < end:
            if select.select([master], [], [], 0.2)[0]:
                seen += os.read(master, 4096)
        assert seen.count(b"start a new conversation") == first + 1, seen.decode(errors="replace")
        end = time.monotonic() + 60
        while not seen.rstrip(b" ").endswith(b">") and time.monotonic() < end:  # the prompt: input() reads again
            if select.select([master], [], [], 0.2)[0]:
                seen += os.read(master, 4096)
        os.write(master, b"\x04")  # Ctrl-D
        assert proc.wait(timeout=120) == 0
    finally:
        proc.kill()
        os.close(master)
    assert b"unknown command" not in seen
