"""Spoken test clips made offline with Debian's espeak-ng, and word-level scoring.

Used by tests/test_speech.py, benchmarks/speech.py and notebooks/05_speech.ipynb.

The voice is espeak-ng's US English with its "klatt4" variant at 130 words a
minute. Whisper-base heard the plain en-us voice's "What is the capital of
France?" at 130 and 150 wpm as "... capital and friends?" (other voices: "...
capital on France?"); the klatt4 variant came back word for word at 110, 130
and 150 wpm.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

VOICE, SPEED = "en-us+klatt4", 130

# Whisper-base's transcripts of these, spoken as above, were checked on this machine
# (benchmarks/speech.py reports them). The first five come back word for word.
SENTENCES = (
    "What is the capital of France?",
    "How many legs does a spider have?",
    "Please tell me a short story about a cat.",
    "Where is the nearest train station?",
    "Thank you very much for your help.",
    # Harder ones, for the benchmark's accuracy table.
    "What is the capital of Germany?",
    "What is two plus two?",
    "I would like a cup of coffee.",
    "The weather is nice today.",
    "How do I make a pancake?",
    "Can you recommend a good book to read?",
    "The quick brown fox jumps over the lazy dog.",
    "Water boils at one hundred degrees.",
    "My favorite color is blue.",
)


def have_espeak() -> bool:
    return shutil.which("espeak-ng") is not None


def speak(text: str, path, voice: str = VOICE, speed: int = SPEED) -> Path:
    """Write `text` spoken by espeak-ng to the wav file `path` (22.05 kHz mono); returns the path."""
    path = Path(path)
    subprocess.run(["espeak-ng", "-v", voice, "-s", str(speed), "-w", str(path), text], check=True,
                   capture_output=True, timeout=60)
    return path


def words(text: str) -> list[str]:
    """Lower case, punctuation dropped, numbers spelled out ("2" -> "two"), hyphens split."""
    from num2words import num2words

    text = re.sub(r"\d+", lambda m: f" {num2words(int(m.group()))} ", text.lower())
    return re.sub(r"[^a-z' ]", " ", text.replace("-", " ")).split()


def word_errors(reference: str, heard: str) -> dict:
    """Substitutions, deletions and insertions of `heard` against `reference`, by word
    (a Levenshtein alignment), and the word accuracy 1 - errors / reference words."""
    ref, hyp = words(reference), words(heard)
    # cost[i][j]: (errors, subs, dels, ins) aligning ref[:i] with hyp[:j]
    cost = [[(j, 0, 0, j) for j in range(len(hyp) + 1)]]
    for i in range(1, len(ref) + 1):
        row = [(i, 0, i, 0)]
        for j in range(1, len(hyp) + 1):
            same = ref[i - 1] == hyp[j - 1]
            d, s, ins = cost[i - 1][j - 1], cost[i - 1][j], row[j - 1]
            row.append(min((d[0] + (not same), d[1] + (not same), d[2], d[3]),
                           (s[0] + 1, s[1], s[2] + 1, s[3]),
                           (ins[0] + 1, ins[1], ins[2], ins[3] + 1)))
        cost.append(row)
    errors, subs, dels, ins = cost[-1][-1]
    return {"substitutions": subs, "deletions": dels, "insertions": ins,
            "accuracy": 1 - errors / max(1, len(ref))}
