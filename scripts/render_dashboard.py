#!/usr/bin/env python3
"""Renders doc/grafana/subtocall.json as a PNG from a live Prometheus, without
Grafana: every panel's own `expr` is evaluated with /api/v1/query_range and
plotted with matplotlib at the panel's gridPos, titled and with legends from
its legendFormat. Grafana's variables are substituted the way Grafana does
with "All" selected: `$procedure` and `$instance` by their allValue,
`$__rate_interval` by max(4 x scrape interval, step + scrape interval).
Collapsed rows are drawn collapsed (their queries are evaluated and reported,
not drawn), as Grafana shows them.

    render_dashboard.py --prometheus http://127.0.0.1:9090 --start T0 --end T1 \
        --step 2 --scrape-interval 2 --out doc/img/dashboard.png

Needs matplotlib (scripts/dashboard-screenshot.sh installs it in a venv under
target/). Prints one line per query: how many series it returned.
"""
import argparse
import datetime as dt
import json
import math
import re
import sys
import urllib.parse
import urllib.request

import matplotlib

matplotlib.use("Agg")
import matplotlib.dates as mdates  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import FancyBboxPatch  # noqa: E402
from matplotlib.ticker import FuncFormatter, LogLocator  # noqa: E402

# Grafana's dark theme and its classic palette (distinct for up to 9 series).
BACKGROUND = "#111217"
PANEL = "#181b1f"
BORDER = "#2c3235"
TEXT = "#ccccdc"
MUTED = "#8e8e9a"
GRID = "#2c3235"
PALETTE = ["#7EB26D", "#EAB839", "#6ED0E0", "#EF843C", "#E24D42", "#1F78C1",
           "#BA43A6", "#705DA0", "#508642", "#CCA300", "#447EBC", "#C15C17"]

UNIT_W = 0.86   # inches per grid column (24 columns)
UNIT_H = 0.40   # inches per grid row
HEADER_H = 0.9  # inches above the grid: title, variables, time range
FOOTER_H = 0.45


def query_range(base, expr, start, end, step):
    params = urllib.parse.urlencode({"query": expr, "start": start, "end": end, "step": step})
    with urllib.request.urlopen(f"{base}/api/v1/query_range?{params}", timeout=30) as r:
        body = json.load(r)
    if body.get("status") != "success":
        raise RuntimeError(f"{expr}: {body}")
    return body["data"]["result"]


def substitute(expr, variables):
    def repl(m):
        name = m.group(1) or m.group(2)
        if name not in variables:
            raise KeyError(f"unknown variable ${name} in {expr}")
        return variables[name]
    return re.sub(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)", repl, expr)


def legend(fmt, labels):
    return re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: labels.get(m.group(1), ""), fmt) or str(labels)


def fmt_seconds(v, _pos=None):
    if v == 0:
        return "0"
    if abs(v) < 1e-3:
        return f"{v * 1e6:.0f} µs"
    if abs(v) < 1:
        return f"{v * 1e3:.3g} ms"
    return f"{v:.3g} s"


def fmt_short(v, _pos=None):
    if abs(v) >= 1000:
        return f"{v / 1000:.3g} K"
    return f"{v:.3g}" if v != int(v) else f"{int(v)}"


def fmt_ops(v, _pos=None):
    return f"{fmt_short(v)} /s" if v else "0"


FORMATTERS = {"s": fmt_seconds, "ops": fmt_ops, "short": fmt_short}


def walk(panels):
    """(panel, hidden) in order; panels in collapsed rows are hidden."""
    for panel in panels:
        yield panel, False
        if panel.get("type") == "row" and panel.get("collapsed"):
            for child in panel.get("panels", []):
                yield child, True


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--prometheus", required=True)
    p.add_argument("--dashboard", default="doc/grafana/subtocall.json")
    p.add_argument("--start", type=float, required=True)
    p.add_argument("--end", type=float, required=True)
    p.add_argument("--step", type=float, default=2)
    p.add_argument("--scrape-interval", type=float, default=2)
    p.add_argument("--out", required=True)
    p.add_argument("--note", default="", help="a line for the footer")
    args = p.parse_args()

    dashboard = json.load(open(args.dashboard))
    rate_interval = max(4 * args.scrape_interval, args.step + args.scrape_interval)
    variables = {"__rate_interval": f"{rate_interval:g}s", "__interval": f"{args.step:g}s"}
    for var in dashboard["templating"]["list"]:
        if var["type"] == "query":
            variables[var["name"]] = var.get("allValue") or ".*"
        elif var["type"] == "datasource":
            variables[var["name"]] = "prometheus"

    # Grid rows hidden by a collapsed row do not take space.
    shown = [(panel, hidden) for panel, hidden in walk(dashboard["panels"])]
    grid_h = max(pn["gridPos"]["y"] + pn["gridPos"]["h"] for pn, hidden in shown if not hidden)
    fig_w = 24 * UNIT_W
    fig_h = HEADER_H + grid_h * UNIT_H + FOOTER_H
    fig = plt.figure(figsize=(fig_w, fig_h), dpi=100, facecolor=BACKGROUND)
    plt.rcParams.update({"font.size": 8, "text.color": TEXT, "axes.labelcolor": TEXT,
                         "xtick.color": MUTED, "ytick.color": MUTED})

    def box(x, y, w, h):
        """Figure fractions (left, bottom, width, height) of grid units."""
        left = x * UNIT_W / fig_w
        top = (HEADER_H + y * UNIT_H) / fig_h
        return left, 1 - top - h * UNIT_H / fig_h, w * UNIT_W / fig_w, h * UNIT_H / fig_h

    start = dt.datetime.fromtimestamp(args.start, dt.timezone.utc)
    end = dt.datetime.fromtimestamp(args.end, dt.timezone.utc)
    fig.text(0.008, 1 - 0.3 / fig_h, f"{dashboard['title']}", fontsize=15, weight="bold",
             va="center")
    labels = "    ".join(f"{v.get('label', v['name'])}: {'All' if v['type'] == 'query' else 'Prometheus'}"
                         for v in dashboard["templating"]["list"])
    fig.text(0.008, 1 - 0.68 / fig_h, labels, fontsize=9, color=MUTED, va="center")
    fig.text(0.992, 1 - 0.3 / fig_h,
             f"{start:%Y-%m-%d %H:%M:%S} to {end:%H:%M:%S} UTC   step {args.step:g}s   "
             f"$__rate_interval = {variables['__rate_interval']}",
             fontsize=9, color=MUTED, ha="right", va="center")
    fig.text(0.008, 0.22 / fig_h,
             "Rendered by scripts/render_dashboard.py, not by Grafana: each panel's own expr from "
             "doc/grafana/subtocall.json evaluated by Prometheus (query_range) over a real run of "
             "scripts/dashboard-screenshot.sh. " + args.note,
             fontsize=8, color=MUTED, va="center")

    empty = []
    for panel, hidden in shown:
        title = panel.get("title", "")
        g = panel["gridPos"]
        if panel.get("type") == "row":
            left, bottom, width, height = box(g["x"], g["y"], 24, 1)
            note = ""
            if panel.get("collapsed"):
                note = (f"   ▸ collapsed ({len(panel.get('panels', []))} panels): "
                        "Redis queue or stream target only; this run used the memory queue "
                        "and WAMP calls, so they have no data")
            fig.text(left + 0.002, bottom + height / 2, ("▸ " if panel.get("collapsed") else "▾ ")
                     + title + note, fontsize=11, weight="bold", va="center")
            continue
        results = []
        for target in panel.get("targets", []):
            expr = substitute(target["expr"], variables)
            series = query_range(args.prometheus, expr, args.start, args.end, args.step)
            print(f"{'(collapsed) ' if hidden else ''}{title} [{target['refId']}]: "
                  f"{len(series)} series", flush=True)
            for s in series:
                results.append((legend(target.get("legendFormat", ""), s["metric"]), s["values"]))
        if hidden:
            continue
        if not results:
            empty.append(title)

        left, bottom, width, height = box(g["x"], g["y"], g["w"], g["h"])
        pad_x, pad_y = 0.06 / fig_w, 0.06 / fig_h
        fig.add_artist(FancyBboxPatch((left + pad_x, bottom + pad_y), width - 2 * pad_x,
                                      height - 2 * pad_y, boxstyle="round,pad=0,rounding_size=0.002",
                                      transform=fig.transFigure, facecolor=PANEL,
                                      edgecolor=BORDER, linewidth=0.8, zorder=-10))
        fig.text(left + 0.12 / fig_w, bottom + height - 0.26 / fig_h, title, fontsize=10,
                 weight="bold", va="center")

        ncol = max(1, round(g["w"] / 3.5))
        legend_rows = math.ceil(len(results) / ncol) if results else 0
        ax_bottom = bottom + (0.42 + 0.24 * legend_rows) / fig_h
        ax_top = bottom + height - 0.5 / fig_h
        ax_left = left + 0.62 / fig_w
        ax_width = width - 0.78 / fig_w
        ax = fig.add_axes([ax_left, ax_bottom, ax_width, ax_top - ax_bottom], facecolor=PANEL)
        for spine in ax.spines.values():
            spine.set_visible(False)
        ax.grid(True, color=GRID, linewidth=0.6)
        ax.set_xlim(start, end)
        ax.xaxis.set_major_formatter(mdates.DateFormatter("%H:%M:%S", tz=dt.timezone.utc))
        ax.xaxis.set_major_locator(mdates.SecondLocator(bysecond=[0, 30]))
        ax.tick_params(length=0, labelsize=7.5)

        defaults = panel.get("fieldConfig", {}).get("defaults", {})
        custom = defaults.get("custom", {})
        log = custom.get("scaleDistribution", {}).get("type") == "log"
        unit = defaults.get("unit", "short")
        ax.yaxis.set_major_formatter(FuncFormatter(FORMATTERS.get(unit, fmt_short)))
        step_lines = custom.get("lineInterpolation") == "stepAfter"

        if not results:
            ax.text(0.5, 0.5, "No data", transform=ax.transAxes, ha="center", va="center",
                    fontsize=12, color=MUTED)
            ax.set_yticks([])
            continue
        for i, (name, values) in enumerate(results):
            times = [dt.datetime.fromtimestamp(float(t), dt.timezone.utc) for t, _ in values]
            ys = [float(v) if v not in ("NaN", "+Inf", "-Inf") else math.nan for _, v in values]
            # A gap where Prometheus returned no sample (more than a step apart).
            xs, vs = [], []
            for j, (t, y) in enumerate(zip(times, ys)):
                if j and (t - times[j - 1]).total_seconds() > 1.5 * args.step:
                    xs.append(t)
                    vs.append(math.nan)
                xs.append(t)
                vs.append(y)
            color = PALETTE[i % len(PALETTE)]
            if step_lines:
                # Wider first, so that series on the same 0/1 values all show.
                width = 1.2 + 1.6 * (len(results) - 1 - i) / len(results)
                ax.step(xs, vs, where="post", color=color, linewidth=width, label=name)
            else:
                ax.plot(xs, vs, color=color, linewidth=1.1, label=name)
                if not log:
                    ax.fill_between(xs, vs, color=color, alpha=0.08, linewidth=0)
        if log:
            ax.set_yscale("log")
            ax.yaxis.set_major_locator(LogLocator(base=10))
            ax.yaxis.set_major_formatter(FuncFormatter(FORMATTERS.get(unit, fmt_short)))
        elif defaults.get("min") == 0:
            ax.set_ylim(bottom=0)
            top = ax.get_ylim()[1]
            if top < 1 and defaults.get("decimals") == 0:
                ax.set_ylim(0, 1.2)
        if defaults.get("decimals") == 0:
            ax.yaxis.get_major_locator().set_params(integer=True)
        ax.legend(loc="upper left", bbox_to_anchor=(-0.02, -0.1), ncol=ncol, frameon=False,
                  fontsize=7.5, handlelength=1.2, columnspacing=1.2, labelcolor=TEXT,
                  borderaxespad=0)

    fig.savefig(args.out, facecolor=BACKGROUND)
    print(f"wrote {args.out}", flush=True)
    if empty:
        print(f"panels without data: {empty}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
