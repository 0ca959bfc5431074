"""
One self-contained HTML page for one run folder, or for several side by side (PPO-max vs vanilla, the compare
runs): it opens offline, with no server and no network request (images embedded, no external scripts or fonts).

What it shows: first the whole run, where the folder has them: the SFT curves (sft_log.jsonl), the reward model's
curves (rm_log.jsonl) and the final evaluation table (eval.jsonl, studies/evaluate.py); then, for each RL stage found in a
folder (every {stage}_log.jsonl whose rows are iterations: PPO, RLOO, RAFT, GRPO, or a stage of your own):
  - the config the run was started with (from its checkpoint);
  - the paper's panels (Secrets of RLHF §5.2: RM score, gold reward, KL to SFT, perplexity, length, win rate vs
    SFT), raw points faint under a smoothed line, the collapse warning marked;
  - the PPO diagnostics, where the log has them (clip fraction, approx. KL, explained variance, value loss,
    entropy, time per phase);
  - the sample table of every eval interval, and each kept rollout token by token, coloured by a per-token
    quantity you pick (KL to the reference, reward, value, advantage, return, entropy, ratio, clipped): one
    colour scale per quantity for the whole page, sequential for the non-negative ones (entropy, clipped),
    diverging around the neutral value for the signed ones;
  - with several folders, the gold-reward-vs-KL frontier of the runs.

Run:
    python -m studies.report out                                   # -> out/report.html
    python -m studies.report out/vanilla out --out_file out/vanilla_vs_ppo_max.html
pipeline.py writes out/report.html at the end. token_view_html is the per-token view on its own, for notebooks:
    from IPython.display import HTML; HTML(token_view_html(row["tokens"], row["per_token"]["k1"], "k1"))
"""
import argparse
import base64
import html
import io
import json
import os

from data import regular_file
from runs import SMOOTH_FROM, complete_lines, holding, read_checkpoint, replaced, run_main, smooth

PAPER_PANELS = [("score_raw", "RM score"), ("gold", "gold reward"), ("kl_seq", "KL to SFT (per response)"),
                ("perplexity", "perplexity"), ("length", "length (tokens)"), ("win_rate_vs_sft", "win rate vs SFT")]
PPO_DIAGNOSTICS = [("clipfrac", "clip fraction"), ("approx_kl", "approx. KL(π_old‖π)"),
                   ("explained_var", "explained variance"), ("vf_loss", "value loss"), ("entropy", "entropy"),
                   (("t_generate", "t_score", "t_train"), "seconds per phase")]
CENTERS = {"ratio": 1.0}  # per-token quantities whose neutral value is not 0
NON_NEGATIVE = ("entropy", "clipped")  # per-token quantities never below 0: a sequential scale from 0
SCALE_QUANTILE = 0.95  # a quantity's colour is full at this quantile of |value − neutral| over every card
SFT_PANELS = [(("train_loss", "val_loss"), "SFT: response-token cross-entropy")]
RM_PANELS = [(("train_loss", "val_loss"), "reward model: Bradley–Terry loss"),
             (("train_acc", "val_acc_labels", "val_acc_gold"), "reward model: pairwise accuracy")]
EVAL_KEYS = ("gold", "verified", "math_acc", "rm", "win_vs_sft", "kl_sft", "length", "eos_rate", "distinct2")
CARD_TIMES = ("When the per-token values were taken: a batch card (best, median, worst) is one of the iteration's "
              "rollouts, its k1, reward, value, advantage, return and entropy computed before the update from the "
              "policy that sampled it, its ratio π/π_old and clipped once the iteration's update is done (GRPO: as its last "
              "epoch saw them); a validation card (val_*) "
              "is sampled after the iteration's update by the updated policy, and has only k1, entropy and the "
              "critic's value (no update used it). k1 = log π(a|s) − log π_ref(a|s) of the sampled token: negative "
              "where the policy made that token less likely than the reference; its mean over samples estimates the "
              "KL, which is never negative, but one token's k1 can be.")


# ----------------------------------------------------------------------------------------------------
# The per-token view

def token_view_html(tokens, values, quantity, scale=None):
    """
    One rollout as coloured text: each token's background shows `values` (one per token). A signed quantity is on
    a diverging scale centred at its neutral value (0; ratio: 1), blue below and red above, the strongest colour at
    ±scale; a non-negative one (NON_NEGATIVE: entropy, clipped) on a sequential scale from white at 0 to purple at
    `scale`. scale defaults to the largest deviation in this rollout (the report passes one scale per quantity for
    the whole page). Hovering a token shows its value. Model output is HTML-escaped. Returns an HTML fragment with
    inline styles (it displays in a notebook as it does in the report).
    """
    center = CENTERS.get(quantity, 0.0)
    sequential = quantity in NON_NEGATIVE
    spread = max([abs(v - center) for v in values if v is not None] + [0.0])
    scale = scale or (spread if spread > 1e-6 else 1.0)                    # all neutral: no colour at all
    spans = []
    for piece, v in zip(tokens, values):
        strength = 0.0 if v is None else max(-1.0, min(1.0, (v - center) / scale))
        rgb = "84,39,143" if sequential else "178,24,43" if strength > 0 else "33,102,172"
        text = html.escape(piece).replace("\n", "↵\n") or "·"             # an empty piece still gets a box
        spans.append(f'<span title="{html.escape(quantity)} = {v if v is None else f"{v:.4g}"}" style="background:'
                     f'rgba({rgb},{abs(strength):.2f});border-radius:2px">{text}</span>')
    low = ("" if sequential else
           f'<span style="background:rgba(33,102,172,1);color:#fff;padding:0 4px">≤ {center - scale:.3g}</span>')
    high = "84,39,143" if sequential else "178,24,43"
    legend = (f'<div style="font:11px sans-serif;color:#555;margin-top:2px">{html.escape(quantity)}: {low}'
              f'<span style="padding:0 4px">{center:g}</span>'
              f'<span style="background:rgba({high},1);color:#fff;padding:0 4px">≥ {center + scale:.3g}</span></div>')
    return (f'<div style="font:13px/1.7 monospace;white-space:pre-wrap;word-break:break-word">{"".join(spans)}</div>'
            + legend)


# ----------------------------------------------------------------------------------------------------
# Figures as embedded images

def figure_html(fig):
    """A matplotlib figure as an <img> with the PNG inline (base64), then closed."""
    import matplotlib.pyplot as plt
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return f'<img alt="" style="max-width:100%" src="data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()}">'


def panels_html(runs, panels, x="iter"):
    """One small plot per (key, title) panel: every run's curve (raw faint under its smoothed line once it has
    SMOOTH_FROM points), and a dashed line where a run first raised the collapse warning."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    ncols = 3
    nrows = -(-len(panels) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(13, 3.1 * nrows), squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    for ax, (keys, title) in zip(axes.flat, panels):
        keys = keys if isinstance(keys, tuple) else (keys,)
        for i, (name, rows) in enumerate(runs):
            for j, key in enumerate(keys):
                pts = [(r[x], r[key]) for r in rows if r.get(key) is not None]
                if not pts:
                    continue
                xs, vs = zip(*pts)
                color = f"C{(i * len(keys) + j) % 10}"
                label = name if len(keys) == 1 else f"{name} {key}"
                if len(pts) >= SMOOTH_FROM:
                    ax.plot(xs, vs, color=color, alpha=0.25, linewidth=0.8)
                    ax.plot(xs, smooth(vs), color=color, label=label)
                else:
                    ax.plot(xs, vs, color=color, marker=".", label=label)
            warned = next((r[x] for r in rows if r.get("collapse_warning")), None)
            if warned is not None:
                ax.axvline(warned, color=f"C{i % 10}", linestyle="--", linewidth=1)
        ax.set_title(title + ("  (dashed: collapse warning)" if any(r.get("collapse_warning") for _, rows in runs
                                                                     for r in rows) else ""), fontsize=9)
        ax.set_xlabel(x)
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=7)
    fig.tight_layout()
    return figure_html(fig)


def frontier_html(runs):
    """Gold reward against KL to SFT over training, one smoothed trajectory per run (the end marked): the
    over-optimisation frontier the runs trace."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4.2))
    for i, (name, rows) in enumerate(runs):
        pts = [(r["kl_seq"], r["gold"]) for r in rows if r.get("kl_seq") is not None and r.get("gold") is not None]
        if pts:
            kl, gold = smooth([p[0] for p in pts]), smooth([p[1] for p in pts])
            ax.plot(kl, gold, color=f"C{i % 10}", label=name)
            ax.plot(kl[-1], gold[-1], "o", color=f"C{i % 10}")
    ax.set_xlabel("KL to SFT per response (nats, smoothed)")
    ax.set_ylabel("gold reward (smoothed)")
    ax.set_title("Gold reward vs KL over training (dot: the end)", fontsize=10)
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend(fontsize=8)
    fig.tight_layout()
    return figure_html(fig)


# ----------------------------------------------------------------------------------------------------
# Reading a run folder

def find_stages(run_dir):
    """The RL stages that ran in run_dir, learnt from what they wrote: every {stage}_log.jsonl whose first row is
    an iteration ("iter"), by name. SFT, RM, DPO and A-LoL log steps, and have no samples to show."""
    stages = []
    for name in sorted(os.listdir(run_dir)) if os.path.isdir(run_dir) else []:
        path = os.path.join(run_dir, name)
        if name.endswith("_log.jsonl") and os.path.isfile(path):
            regular_file(path, "a run's log")                              # a FIFO would block
            with open(path, "rb") as f:
                first = f.readline(1 << 20)
            try:
                row = json.loads(first)
                is_iterations = isinstance(row, dict) and "iter" in row
            except (ValueError, RecursionError):                            # empty, or not a log of ours
                is_iterations = False
            if is_iterations:
                stages.append(name[:-len("_log.jsonl")])
    return stages


def run_config(run_dir, stage):
    """The config a stage's run started with (from its checkpoint), or {} when there is no checkpoint yet."""
    path = os.path.join(run_dir, f"{stage}.pt")
    if not os.path.lexists(path):
        return {}
    config = read_checkpoint(path).get("config", {})
    if not isinstance(config, dict):
        raise ValueError(f"{path}: its 'config' is not a set of options; not a checkpoint of this project?")
    return config


def read_rows(path, check_row):
    """A run's JSONL file -> its rows, each checked by check_row(row) (None, or what is wrong with it). A last line
    without its newline (the run is writing it, or was killed mid-write) is left out; any other line that is not a
    row of ours is a one-line error naming file:line."""
    regular_file(path, "a run's log")
    rows = []
    for lineno, line in enumerate(complete_lines(path), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except (ValueError, RecursionError):
            raise ValueError(f"{path}:{lineno}: not a line of JSON; the file is damaged or not written by a run") from None
        problem = check_row(row) if isinstance(row, dict) else "not a JSON object"
        if problem:
            raise ValueError(f"{path}:{lineno}: {problem}; the file is damaged or not written by a run")
        rows.append(row)
    return rows


def _number(v):
    return v is None or (isinstance(v, (int, float)) and not isinstance(v, bool))


def _iteration(row):
    return row.get("iter") is not None and _number(row["iter"])


def log_row_problem(row):
    """What is wrong with a log row for the page (None when nothing): an iteration number, and numbers (or null)
    wherever a panel reads a value."""
    if not _iteration(row):
        return "no iteration number ('iter')"
    keys = [k for keys, _ in PAPER_PANELS + PPO_DIAGNOSTICS for k in (keys if isinstance(keys, tuple) else (keys,))]
    bad = [k for k in keys if k in row and not _number(row[k])]
    return f"'{bad[0]}' is not a number" if bad else None


def sample_row_problem(row):
    """What is wrong with a samples row (None when nothing): its fields, with one value per token per quantity."""
    if not _iteration(row):
        return "no iteration number ('iter')"
    if not all(isinstance(row.get(k), str) for k in ("sample", "prompt")):
        return "'sample' and 'prompt' must be text"
    if not isinstance(row.get("rm_score"), (int, float)) or not _number(row.get("gold")):
        return "'rm_score' (and 'gold') must be numbers"
    tokens, per_token = row.get("tokens"), row.get("per_token")
    if not isinstance(tokens, list) or not all(isinstance(t, str) for t in tokens) or not isinstance(per_token, dict):
        return "'tokens' must be a list of text and 'per_token' an object"
    for q, values in per_token.items():
        if not isinstance(values, list) or len(values) != len(tokens) or not all(map(_number, values)):
            return f"per_token '{q}' must hold one number (or null) per token"
    return None


def colour_scales(rows, quantities):
    """One colour scale per quantity over every card of `rows`: the SCALE_QUANTILE quantile of |value − neutral|
    (1 when every value is neutral), so the same colour means the same value on every card of the page."""
    scales = {}
    for q in quantities:
        devs = sorted(abs(v - CENTERS.get(q, 0.0)) for r in rows for v in r["per_token"].get(q, ()) if v is not None)
        scale = devs[min(len(devs) - 1, int(SCALE_QUANTILE * len(devs)))] if devs else 0.0
        scales[q] = scale if scale > 1e-6 else 1.0
    return scales


def samples_html(rows, quantities, scales):
    """The kept rollouts grouped by eval interval: a table row each, and its per-token view for every quantity
    (the page shows the one picked in the menu), each on the page's scale for that quantity, or a note where the
    card has no such values."""
    out = []
    for it in dict.fromkeys(r["iter"] for r in rows):
        out.append(f"<h4>iteration {it}</h4>")
        for r in (r for r in rows if r["iter"] == it):
            views = "".join(f'<div class="tv" data-q="{i}">'            # the menu's index: no name in the CSS
                            + (token_view_html(r["tokens"], r["per_token"][q], q, scales[q]) if q in r["per_token"]
                               else f'<p class="note">{html.escape(q)}: not computed for this card</p>') + '</div>'
                            for i, q in enumerate(quantities))
            gold = "–" if r.get("gold") is None else f'{r["gold"]:+.3f}'
            out.append(f'<div class="sample"><div class="meta"><b>{html.escape(r["sample"])}</b> · RM '
                       f'{r["rm_score"]:+.2f} · gold {gold} · {len(r["tokens"])} tokens</div>'
                       f'<div class="prompt">{html.escape(r["prompt"].strip())}</div>{views}</div>')
    return "\n".join(out)


def config_html(cfg):
    cells = "".join(f"<tr><td>{html.escape(str(k))}</td><td>{html.escape(json.dumps(v, default=str))}</td></tr>" for k, v in cfg.items())
    return f'<details><summary>config ({len(cfg)} options)</summary><table class="cfg">{cells}</table></details>'


PAGE = """<!doctype html><html><head><meta charset="utf-8"><title>{title}</title><style>
body{{font:14px sans-serif;margin:24px;max-width:1250px;color:#222}} h2{{border-bottom:1px solid #ccc}}
.sample{{border:1px solid #ddd;border-radius:4px;padding:6px 10px;margin:6px 0}} .meta{{font-size:12px;color:#555}}
.prompt{{font:12px monospace;color:#666;white-space:pre-wrap;margin:2px 0 4px}} .tv{{display:none}}
table.cfg td{{font:12px monospace;padding:0 8px}} .note{{color:#555;font-size:13px}}
table.ev{{border-collapse:collapse}} table.ev td,table.ev th{{border:1px solid #ddd;padding:2px 8px;font-size:13px}}
</style></head><body data-q="{first}"><h1>{title}</h1>
<p class="note">Colour tokens by <select id="q" onchange="document.body.dataset.q=this.value">{options}</select>
(signed quantities: blue below, red above the neutral value, 0 or 1 for the ratio; entropy and clipped: white at 0
to purple; one scale per quantity for the whole page, full colour at the 95th percentile of every card's values;
hover a token for its value).</p>
<style>{show}</style>{body}</body></html>"""


def step_row_problem(row):
    """What is wrong with an SFT or RM log row for the page (None when nothing): a step number, and numbers (or
    null) wherever a panel reads a value."""
    if row.get("step") is None or not _number(row["step"]):
        return "no step number ('step')"
    bad = [k for keys, _ in SFT_PANELS + RM_PANELS for k in keys if k in row and not _number(row[k])]
    return f"'{bad[0]}' is not a number" if bad else None


def eval_row_problem(row):
    """What is wrong with an eval.jsonl row for the page (None when nothing)."""
    if not isinstance(row.get("policy"), str):
        return "no policy name ('policy')"
    bad = [k for k in EVAL_KEYS if k in row and not _number(row[k])]
    return f"'{bad[0]}' is not a number" if bad else None


def whole_run_html(run_dir):
    """The run before and after its RL stage: the SFT and reward-model curves and the final evaluation table, from
    whichever of sft_log.jsonl, rm_log.jsonl and eval.jsonl the folder holds ("" when none)."""
    parts = []
    for stage, panels in (("sft", SFT_PANELS), ("rm", RM_PANELS)):
        path = os.path.join(run_dir, f"{stage}_log.jsonl")
        if os.path.lexists(path):
            rows = [r for r in read_rows(path, step_row_problem) if any(k in r for ks, _ in panels for k in ks)]
            if rows:
                parts.append(panels_html([(stage.upper(), rows)], panels, x="step"))
    path = os.path.join(run_dir, "eval.jsonl")
    if os.path.lexists(path):
        rows = read_rows(path, eval_row_problem)
        keys = [k for k in EVAL_KEYS if any(k in r for r in rows)]
        head = "".join(f"<th>{k}</th>" for k in ["policy", "stage"] + keys)
        body = "".join("<tr>" + f"<td>{html.escape(r['policy'])}</td><td>{html.escape(str(r.get('stage', '')))}</td>"
                       + "".join(f"<td>{'–' if r.get(k) is None else f'{r[k]:.3f}'}</td>" for k in keys) + "</tr>"
                       for r in rows)
        n = rows[0].get("n_prompts", "?") if rows else "?"
        parts.append(f'<h3>Final evaluation (studies/evaluate.py, {html.escape(str(n))} test prompts)</h3>'
                     f'<table class="ev"><tr>{head}</tr>{body}</table>')
    return "\n".join(parts)


def report(run_dirs, out_file):
    """Write the page for run_dirs to out_file; returns out_file. A folder with no RL stage log is an error."""
    found, all_runs, quantities = [], [], []
    for run_dir in run_dirs:                 # first read everything: the menu and the colour scales are page-wide
        stages = find_stages(run_dir)
        if not stages:
            raise ValueError(f"{run_dir}: no run here (no {{stage}}_log.jsonl of iterations: PPO, RLOO, RAFT, GRPO, ...)")
        for stage in stages:
            name = f"{os.path.basename(os.path.normpath(run_dir))} {stage}"
            rows = read_rows(os.path.join(run_dir, f"{stage}_log.jsonl"), log_row_problem)
            all_runs.append((name, rows))
            samples_path = os.path.join(run_dir, f"{stage}_samples.jsonl")
            samples = read_rows(samples_path, sample_row_problem) if os.path.lexists(samples_path) else []
            for r in samples:
                quantities += [q for q in r["per_token"] if q not in quantities]
            found.append((run_dir, stage, name, rows, samples))
    quantities = quantities or ["k1"]
    scales = colour_scales([r for *_, samples in found for r in samples], quantities)
    sections, seen = [], set()
    for run_dir, stage, name, rows, samples in found:
        if run_dir not in seen:
            seen.add(run_dir)
            whole = whole_run_html(run_dir)
            if whole:
                sections.append(f"<h2>{html.escape(os.path.normpath(run_dir))}: SFT, reward model, evaluation</h2>"
                                + whole)
        finished = bool(rows) and rows[-1].get("iter") == run_config(run_dir, stage).get("n_iters")
        parts = [f'<h2>{html.escape(name)}</h2><p class="note">{len(rows)} iterations logged'
                 f'{"" if finished else " (the run has not finished)"}; folder {html.escape(run_dir)}</p>',
                 config_html(run_config(run_dir, stage)), "<h3>The paper's panels</h3>",
                 panels_html([(name, rows)], PAPER_PANELS)]
        if any("explained_var" in r for r in rows):                     # a critic's run: PPO's diagnostics
            parts += ["<h3>PPO diagnostics</h3>", panels_html([(name, rows)], PPO_DIAGNOSTICS)]
        parts += ["<h3>Samples (best, median and worst of the batch by RM score; val_*: the same validation "
                  f'prompts every time)</h3><p class="note">{html.escape(CARD_TIMES)}</p>',
                  samples_html(samples, quantities, scales) if samples else '<p class="note">no samples log</p>']
        sections.append("\n".join(parts))
    if len(all_runs) > 1:
        sections.insert(0, "<h2>All runs</h2>" + frontier_html(all_runs) + panels_html(all_runs, PAPER_PANELS))
    # the quantities are named in the page's text only (escaped); the menu, the CSS and the views use their index
    first = quantities.index("k1") if "k1" in quantities else 0              # shown first: KL to the reference
    options = "".join(f'<option value="{i}"{" selected" if i == first else ""}>{html.escape(q)}</option>'
                      for i, q in enumerate(quantities))
    show = " ".join(f'body[data-q="{i}"] .tv[data-q="{i}"]{{display:block}}' for i in range(len(quantities)))
    title = "RLHF report: " + ", ".join(os.path.normpath(d) for d in run_dirs)
    page = PAGE.format(title=html.escape(title), first=first, options=options, show=show, body="\n".join(sections))
    with holding(os.path.dirname(os.path.abspath(out_file))):     # no run writes into the folder meanwhile
        with replaced(out_file, "w", encoding="utf-8") as f:
            f.write(page)
    return out_file


def main(argv=None):
    p = argparse.ArgumentParser(description="One self-contained HTML report for one or several run folders.")
    p.add_argument("run_dirs", nargs="+", help="folders holding an RL run (PPO, RLOO, RAFT, GRPO, ...: its *_log.jsonl)")
    p.add_argument("--out_file", default=None, help="the page to write (default: FIRST_RUN_DIR/report.html)")
    a = p.parse_args(argv)
    path = report(a.run_dirs, a.out_file or os.path.join(a.run_dirs[0], "report.html"))
    print(f"report: {path} ({os.path.getsize(path) / 1e6:.1f} MB)")
    return path


if __name__ == "__main__":
    run_main(main)
