"""`python -m chat`: the terminal loop, end to end in a subprocess with the bundled model."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run_chat(args: list[str], stdin: str = "", **env) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "chat", *args],
        input=stdin,
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, **env},
        timeout=180,
    )


def test_terminal_chat_streams_a_multi_turn_conversation():
    stdin = "What is the capital of Germany?\n/facts\nAnd of France?\n/reset\n/quit\nnever read\n"
    done = run_chat(["--temperature", "0", "--seed", "1"], stdin)
    assert done.returncode == 0, done.stderr
    answers = done.stdout.strip().splitlines()
    assert len(answers) == 2 and "Berlin" in answers[0] and "Paris" in answers[1]  # the second turn saw the first
    assert "SmolLM2-135M-Instruct (bundled)" in done.stderr and "Loaded." in done.stderr
    assert "conversation forgotten" in done.stderr and "Traceback" not in done.stderr


def test_facts_only_and_errors_are_one_line():
    facts = run_chat(["--facts"])
    assert facts.returncode == 0 and "30 layers" in facts.stderr and facts.stdout == ""

    missing = run_chat(["--model", "no-such-model.gguf"])
    assert missing.returncode == 2 and missing.stderr.startswith("error: No model called")
    assert len(missing.stderr.strip().splitlines()) == 1

    small_machine = dict(LENSBENCH_MEMORY_LIMIT="50MB", LENSBENCH_PHYSICAL_MEMORY="50MB")
    too_big = run_chat([], "Hello\n", **small_machine)
    assert too_big.returncode == 2 and too_big.stdout == ""
    lines = too_big.stderr.strip().splitlines()
    assert "Does not fit" in lines[0] and lines[-1].startswith("error: ") and "this machine's 50.0 MB" in lines[-1]
    assert "--ignore-memory-check" in lines[-1]


def test_a_tight_fit_loads_with_one_warning_line_and_the_override_loads_a_refused_model():
    question = "What is the capital of Germany?\n"
    tight = run_chat(["--temperature", "0", "--seed", "1"], question,
                     LENSBENCH_MEMORY_LIMIT="50MB", LENSBENCH_PHYSICAL_MEMORY="64GB")
    assert tight.returncode == 0, tight.stderr
    assert "Tight: needs about" in tight.stderr.splitlines()[0]
    warnings = [line for line in tight.stderr.splitlines() if line.startswith("warning: ")]
    assert len(warnings) == 1 and "only 50.0 MB of this machine's 64.0 GB is free now" in warnings[0]
    assert "Berlin" in tight.stdout

    forced = run_chat(["--ignore-memory-check", "--temperature", "0", "--seed", "1"], question,
                      LENSBENCH_MEMORY_LIMIT="50MB", LENSBENCH_PHYSICAL_MEMORY="50MB")
    assert forced.returncode == 0, forced.stderr
    warnings = [line for line in forced.stderr.splitlines() if line.startswith("warning: ")]
    assert len(warnings) == 1 and "memory check is off" in warnings[0]
    assert "Berlin" in forced.stdout and "Traceback" not in forced.stderr


def test_ctrl_c_stops_the_answer_and_the_chat_goes_on():
    chat = subprocess.Popen(
        [sys.executable, "-m", "chat", "--max-tokens", "1000", "--temperature", "0"],
        cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, bufsize=0,
        # A shell runs a background job (`make test &`) with SIGINT ignored, and Python then never turns it
        # into KeyboardInterrupt: the chat gets the default a terminal gives it.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        # Counting has no natural end: the answer runs to --max-tokens (1000 tokens, 20 s or more here)
        # unless Ctrl-C stops it, even when a busy machine delays the signal.
        chat.stdin.write("Count from 1 to 5000, one number after another, separated by commas.\n")
        chat.stdin.flush()
        assert len(chat.stdout.read(10)) == 10  # the answer is streaming
        chat.send_signal(signal.SIGINT)
        # (forgetting the count first: after it, this small model answers the question badly)
        chat.stdin.write("/reset\nWhat is the capital of Germany?\n")
        out, err = chat.communicate(input="", timeout=120)
    finally:
        chat.kill()
    assert chat.returncode == 0, err
    assert "(stopped)" in err and "Traceback" not in err
    stopped_answer = out.split("\n")[0]
    assert len(stopped_answer) < 600 and "Berlin" in out  # cut well before its 1000 tokens; the next answer comes
