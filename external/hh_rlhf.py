"""
Anthropic HH-RLHF preference files (.jsonl or .jsonl.gz, one {"chosen": ..., "rejected": ...} object per line,
each a dialogue "\n\nHuman: ...\n\nAssistant: ...") as the stages' data: `--data FILE[,FILE...]` in SFT (the
chosen responses), the reward model (the pairs), PPO (the prompts) and evaluate.py. A record is split at its
last "\n\nAssistant:" into the prompt (all earlier turns) and the final response.
"""
import gzip
import json
import random
import sys
import zlib

from data import ASSISTANT, EOS_TEXT, HUMAN, SPLIT_FRACTIONS
from utils import regular_file


def split_hh(text):
    """Split one HH-RLHF dialogue at its last "\\n\\nAssistant:" into (prompt ending in it, final response)."""
    i = text.rfind(ASSISTANT)
    if i < 0:
        raise ValueError(f'no "{ASSISTANT.strip()}" turn')
    return text[: i + len(ASSISTANT)], text[i + len(ASSISTANT):]


def _read_records(path):
    """load_hh_jsonl's loop: (records, {skip reason: [line numbers]})."""
    opener = gzip.open if str(path).endswith(".gz") else open
    records, skipped = [], {}                                             # skipped: reason -> [line numbers]
    with opener(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")          # utf-8-sig drops a BOM
            except UnicodeDecodeError:
                raise ValueError(f"{path}:{lineno}: not UTF-8 text") from None
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: not valid JSON ({e.msg}); expected one object per line") from None
            except RecursionError:
                raise ValueError(f"{where}: JSON nested too deeply; expected one flat object per line") from None
            if not isinstance(rec, dict):
                raise ValueError(f"{where}: expected a JSON object with 'chosen' and 'rejected'")
            for field in ("chosen", "rejected"):
                if not isinstance(rec.get(field), str):
                    raise ValueError(f"{where}: field '{field}' is missing or not a string")
                try:
                    rec[field].encode("utf-8")       # JSON may spell a lone surrogate (\ud800), which no text holds
                except UnicodeEncodeError as e:
                    raise ValueError(f"{where}: field '{field}' holds {rec[field][e.start]!r} at character {e.start}, "
                                     f"half of a UTF-16 pair, which is not text; fix or drop the line") from None
            if ASSISTANT not in rec["chosen"] or ASSISTANT not in rec["rejected"]:
                skipped.setdefault(f'with no "{ASSISTANT.strip()}" turn', []).append(lineno)
                continue
            prompt, chosen = split_hh(rec["chosen"])
            prompt_rejected, rejected = split_hh(rec["rejected"])
            if prompt != prompt_rejected:
                reason = "whose chosen and rejected differ before the last Assistant turn"
                skipped.setdefault(reason, []).append(lineno)
            elif not prompt.replace(HUMAN, "").replace(ASSISTANT, "").strip():
                skipped.setdefault("with an empty prompt", []).append(lineno)
            else:
                records.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    return records, skipped


def load_hh_jsonl(path):
    """
    Read an HH-RLHF .jsonl or .jsonl.gz file into [{"prompt", "chosen", "rejected"}] (responses without EOS).
    A UTF-8 byte-order mark, CRLF line ends and blank lines are fine. A line that is not a JSON object with
    string fields 'chosen' and 'rejected' means the file is not HH data: ValueError naming the file and the
    1-based line. A record that does not split into one shared prompt and two responses is skipped, and every
    skip is reported in one warning line (how many, why, the first line numbers): the real Anthropic files
    hold such records, e.g. chosen and rejected differing before the last Assistant turn where a turn marker
    was written "  Human:" without the blank line. A file with no usable record is an error.
    """
    regular_file(path, "--data (HH-RLHF .jsonl or .jsonl.gz files)")     # a FIFO would block, a folder fail late
    try:
        records, skipped = _read_records(path)
    except (OSError, EOFError, zlib.error) as e:  # unreadable, or a damaged / not-really-gzip .gz
        detail = getattr(e, "strerror", None) or str(e) or type(e).__name__
        raise ValueError(f"{path}: cannot be read ({detail}); is it a complete .jsonl / .jsonl.gz file?") from None
    n_skipped = sum(len(lines) for lines in skipped.values())
    reasons = "; ".join(f"{len(lines)} {reason} (line{'s' if len(lines) > 1 else ''} "
                        f"{', '.join(map(str, lines[:5]))}{', ...' if len(lines) > 5 else ''})"
                        for reason, lines in skipped.items())
    if not records:
        raise ValueError(f"{path}: no usable records" + (f": all {n_skipped} skipped, {reasons}" if skipped else
                                                         " (the file is empty)"))
    if skipped:
        print(f"warning: {path}: skipped {n_skipped} of {n_skipped + len(records)} records that do not split into "
              f"one prompt and two responses: {reasons}", file=sys.stderr)
    return records


def hh_splits(paths, seed=0):
    """
    HH-RLHF file(s) (comma-separated .jsonl / .jsonl.gz) -> {"train"|"val"|"test": [{"prompt", "chosen",
    "rejected"}]}: all records shuffled by `seed`, cut 80/10/10 (at least one record in each split), with EOS
    appended to both responses so that they end as the policy's own answers do.
    """
    files = [p.strip() for p in paths.split(",")]
    if not all(files):
        raise ValueError(f"--data {paths!r}: an empty file name (a stray comma?); give comma-separated files")
    records = [dict(r, chosen=r["chosen"] + EOS_TEXT, rejected=r["rejected"] + EOS_TEXT)
               for p in files for r in load_hh_jsonl(p)]
    if len(records) < 3:
        raise ValueError(f"{paths}: {len(records)} records; need at least 3 (train, val and test)")
    random.Random(seed).shuffle(records)
    n_val = n_test = max(1, int(SPLIT_FRACTIONS[1] * len(records)))
    n_train = len(records) - n_val - n_test
    return {"train": records[:n_train], "val": records[n_train:n_train + n_val], "test": records[n_train + n_val:]}


def prompt_splits(paths, seed=0):
    """The prompts of hh_splits in the toy task's shape, {"train"|"val"|"test": {"hh": [prompt]}}, so that every
    stage draws prompts the same way (data.sample_prompts) whatever the data."""
    return {name: {"hh": [r["prompt"] for r in records]} for name, records in hh_splits(paths, seed).items()}
