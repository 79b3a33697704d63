"""What bench/freshness.py prints and draws from the trainer side's figures: the
`freshness ...` and `freshness-cut ...` lines, and the picture of freshness against replicas."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bench.hostlab import rate_bits

SLOW, FAST = "1gbit", "10gbit"
FANOUTS = ("chain", "direct")


def report(rate: str, results: list[dict[str, Any]], model_bytes: int, mib: int) -> None:
    wire_s = model_bytes * 8 / rate_bits(rate)
    for fanout in FANOUTS:
        rows = [r for r in results if r["kind"] == "freshness" and r["fanout"] == fanout]
        one = next((r["seconds"] for r in rows if r["replicas"] == 1), None)
        for r in rows:
            ratio = f"{r['seconds'] / one:.2f}" if one else "n/a"
            note = f"  # sync() {r['sync_s']:.3f}s, all serving {r['served_s']:.3f}s"
            if rate == FAST:
                note += "; CPU-bound on two cores"
            print(
                f"freshness link={rate} fanout={fanout} replicas={r['replicas']} "
                f"model_mib={mib} seconds={r['seconds']:.3f} "
                f"link_bound_ratio={wire_s / r['seconds']:.2f} ratio_vs_one={ratio}{note}",
                flush=True,
            )
    for r in results:
        if r["kind"] != "cut":
            continue
        head = f"freshness-cut link={rate} fanout={r['fanout']} replicas={r['replicas']}"
        if "error" in r:
            print(f"{head} failed: {r['error']}", flush=True)
            continue
        after = r["after_restore_s"]
        print(
            f"{head} cut={r['cut']} cut_at={r.get('cut_at', 0):g} model_mib={mib} "
            f"others_seconds={r['others_s']:.3f} "
            f"normal_seconds={r['normal_s']:.3f} "
            f"ratio_vs_normal={r['others_s'] / r['normal_s']:.2f} "
            f"cut_serves_newest_within_one_sync={'yes' if r['caught_up'] else 'no'}"
            f"  # median of {len(r.get('others_all', [0]))} cut(s): "
            f"{', '.join(f'{s:.3f}' for s in r.get('others_all', [r['others_s']]))}s; "
            f"caught up within one sync in {r.get('caught_up_runs', int(r['caught_up']))}; "
            f"committed on {r['committed']}, lagging {','.join(r['lagging']) or 'none'}; "
            f"next sync {r['next_sync_s']:.3f}s; cut one serving the newest "
            + (f"{after:.3f}s after restore" if after is not None else "not within 60s"),
            flush=True,
        )


STYLE = {
    ("chain", SLOW): "o-",
    ("direct", SLOW): "o--",
    ("chain", FAST): "s-",
    ("direct", FAST): "s--",
}


def picture(
    path: Path, figures: dict[str, list[dict[str, Any]]], model_bytes: int, mib: int
) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"# no picture: matplotlib is missing (pip install -e '.[bench]'); not {path}")
        return
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    for rate, results in figures.items():
        label_rate = "1 Gbit/s" if rate == SLOW else "10 Gbit/s (CPU-bound, 2 cores)"
        for fanout in FANOUTS:
            rows = [r for r in results if r["kind"] == "freshness" and r["fanout"] == fanout]
            if rows:
                ax.plot(
                    [r["replicas"] for r in rows],
                    [r["seconds"] for r in rows],
                    STYLE[(fanout, rate)],
                    label=f"{fanout} fan-out, {label_rate}",
                )
    slow = [r for r in figures.get(SLOW, []) if r["kind"] == "freshness"]
    if slow:
        top = max(r["replicas"] for r in slow)
        wire_s = model_bytes * 8 / rate_bits(SLOW)
        ax.plot(
            [1, top],
            [wire_s, top * wire_s],
            ":",
            color="grey",
            label="one copy per replica, 1 Gbit/s",
        )
        ax.axhline(wire_s, linestyle=":", color="green", label="one copy in all, 1 Gbit/s")
    ax.set_xlabel("replicas")
    ax.set_ylabel("seconds from sync() to all serving")
    ax.set_title(f"Freshness, {mib} MiB model changed whole, emulated hosts, 2 CPU cores")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    print(f"# picture: {path}")
