"""An offline attention explorer: one self-contained HTML file (inline CSS, vanilla JS, inline JSON data).

    write_attention_html("view.html", client.translate(texts, attention=["cross", "decoder_self",
                                                                         "encoder_self"]))

The page needs no network and opens from file://. For each text it offers the kinds present (cross, decoder
self, encoder self), a layer and a head (each also as "average"), an overview of every layer x head, a
heatmap with token labels on both axes and the value under the mouse, and a BertViz-like view that draws lines
between a column of query tokens and a column of key tokens, brighter for more attention; hovering (or
clicking, to pin) a query token shows where it looks, a key token shows who looks at it. The URL fragment
`#text=2&kind=encoder_self&layer=1&head=0&row=3` opens a given view (bookmarks, screenshots).

Items are ClientTranslation objects (service.client.translator_client) or mappings with the same names:
`source_tokens`,
`target_tokens`, `text` (or `translation`), optionally `source` (the input text), and `attention` (or `maps`):
{kind: map}, each map holding `weights` [layers, heads, rows, cols], `row_tokens`, `column_tokens`, and
optionally `layers` and `heads` (the model's indices; default 0..n-1).

Token strings are untrusted (they echo user input): the data travels as JSON inside a
<script type="application/json"> element with every "<", ">" and "&" escaped, and the script only ever puts
tokens into the page through textContent, never as markup.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

KIND_ORDER = ("cross", "decoder_self", "encoder_self")
# Weights are stored as integers out of SCALE: a third smaller than decimal floats, precise to 1e-4.
SCALE = 10000


def _get(item: Any, *names: str, default: Any = None) -> Any:
    """The first of `names` present on an object (attribute) or a mapping (key)."""
    for name in names:
        if isinstance(item, Mapping):
            if name in item:
                return item[name]
        elif hasattr(item, name):
            return getattr(item, name)
    return default


def _map_data(kind: str, data: Any) -> dict[str, Any]:
    weights = np.asarray(_get(data, "weights"), dtype=np.float64)
    if weights.ndim != 4:
        raise ValueError(f"{kind} attention must be [layers, heads, rows, cols], got shape {weights.shape}")
    n_layers, n_heads, rows, cols = weights.shape
    row_tokens = [str(t) for t in _get(data, "row_tokens", default=[])]
    column_tokens = [str(t) for t in _get(data, "column_tokens", default=[])]
    if (len(row_tokens), len(column_tokens)) != (rows, cols):
        raise ValueError(f"{kind} attention is {rows} x {cols} but has {len(row_tokens)} row and "
                         f"{len(column_tokens)} column tokens")
    layers = [int(i) for i in _get(data, "layers", default=None) or range(n_layers)]
    heads = [int(i) for i in _get(data, "heads", default=None) or range(n_heads)]
    if (len(layers), len(heads)) != (n_layers, n_heads):
        raise ValueError(f"{kind} attention has {n_layers} layers x {n_heads} heads but {len(layers)} layer "
                         f"and {len(heads)} head indices")
    quantised = np.rint(np.clip(np.nan_to_num(weights), 0.0, 1.0) * SCALE).astype(np.int64)
    return {"shape": [n_layers, n_heads, rows, cols], "layers": layers, "heads": heads, "rows": row_tokens,
            "cols": column_tokens, "q": quantised.ravel().tolist()}


def _item_data(item: Any) -> dict[str, Any]:
    maps = _get(item, "attention", "maps", default=None) or {}
    source_tokens = [str(t) for t in _get(item, "source_tokens", default=[])]
    return {
        "source": str(_get(item, "source", default="") or " ".join(t for t in source_tokens if t != "</s>")),
        "translation": str(_get(item, "text", "translation", default="")),
        "source_tokens": source_tokens,
        "target_tokens": [str(t) for t in _get(item, "target_tokens", default=[])],
        "maps": {kind: _map_data(kind, maps[kind]) for kind in sorted(maps, key=_kind_rank)},
    }


def _kind_rank(kind: str) -> tuple[int, str]:
    return (KIND_ORDER.index(kind) if kind in KIND_ORDER else len(KIND_ORDER), kind)


def _script_json(value: Any) -> str:
    """JSON that cannot end its <script> element early nor open a comment: `<`, `>`, `&` become \\u escapes,
    which JSON.parse turns back into the same characters."""
    text = json.dumps(value, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    # U+2028/2029 are legal in JSON strings; escaping them keeps the file friendly to any JS tooling too.
    for char, escape in (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026"), ("\u2028", "\\u2028"),
                         ("\u2029", "\\u2029")):
        text = text.replace(char, escape)
    return text


def attention_page(items: Iterable[Any], title: str = "Attention explorer") -> str:
    """The page as a string (see write_attention_html)."""
    data = {"scale": SCALE, "items": [_item_data(item) for item in items]}
    # Split rather than chained replace, so that a title can never smuggle a marker into the data or back.
    before, after = _TEMPLATE.split("__DATA__")
    return before.replace("__TITLE__", _html_text(title)) + _script_json(data) + after


def _html_text(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace('"', "&quot;")


def write_attention_html(path: str | Path, items: Sequence[Any] | Iterable[Any],
                         title: str = "Attention explorer") -> Path:
    """Write the explorer for `items` (one per text) to `path` and return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(attention_page(items, title), encoding="utf-8")
    return path


_TEMPLATE = r"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>__TITLE__</title>
<style>
:root {
  --bg: #fafafa; --fg: #1d1d1f; --muted: #6e6e73; --line: #d2d2d7; --accent: #0a66c2; --focus: #e8590c;
  --panel: #ffffff; --cell: 18px;
  font-family: system-ui, -apple-system, "Segoe UI", Roboto, "DejaVu Sans", sans-serif;
}
* { box-sizing: border-box; }
body { margin: 0; background: var(--bg); color: var(--fg); font-size: 14px; }
header { position: sticky; top: 0; z-index: 5; background: var(--panel); border-bottom: 1px solid var(--line);
  padding: 10px 18px; }
h1 { font-size: 17px; margin: 0 12px 0 0; display: inline-block; }
h2 { font-size: 14px; margin: 0 0 8px; color: var(--muted); font-weight: 600; }
.controls { display: inline-flex; flex-wrap: wrap; gap: 10px 16px; align-items: center;
  vertical-align: middle; }
.controls label { color: var(--muted); }
select { font: inherit; padding: 2px 4px; max-width: 46ch; }
.seg { display: inline-flex; border: 1px solid var(--line); border-radius: 6px; overflow: hidden; }
.seg button { font: inherit; border: 0; background: none; padding: 3px 10px; cursor: pointer;
  color: var(--fg); }
.seg button + button { border-left: 1px solid var(--line); }
.seg button[aria-pressed="true"] { background: var(--accent); color: #fff; }
#sentence { margin-top: 8px; line-height: 1.5; }
#sentence .label { color: var(--muted); display: inline-block; min-width: 6.5em; }
#hint { color: var(--muted); font-size: 12px; }
main { display: flex; flex-wrap: wrap; gap: 18px; padding: 16px 18px; align-items: flex-start; }
section.card { background: var(--panel); border: 1px solid var(--line); border-radius: 8px; padding: 12px; }
#overview { display: grid; gap: 6px; align-items: center; }
#overview .ax { font-size: 11px; color: var(--muted); text-align: center; white-space: nowrap; }
#overview canvas { border: 2px solid transparent; border-radius: 3px; cursor: pointer;
  image-rendering: pixelated; display: block; }
#overview canvas:hover { border-color: var(--line); }
#overview canvas.selected { border-color: var(--focus); }
#heatmap { display: grid; width: max-content; user-select: none; }
#heatmap .col { writing-mode: vertical-rl; transform: rotate(180deg); text-align: left; white-space: nowrap;
  padding: 2px 0; font-size: var(--font); line-height: var(--cell); border-radius: 3px; }
#heatmap .row { text-align: right; white-space: nowrap; padding: 0 6px 0 2px; font-size: var(--font);
  line-height: var(--cell); border-radius: 3px; cursor: pointer; }
#heatmap .cell { width: var(--cell); height: var(--cell); outline: 0.5px solid rgba(255, 255, 255, 0.18); }
#heatmap .cell.cross { outline: 1px solid rgba(255, 255, 255, 0.7); }
#heatmap .focus { font-weight: 700; color: var(--focus); }
#lines svg { display: block; }
#lines text { font-size: 13px; cursor: pointer; fill: var(--fg); }
#lines text.focus { font-weight: 700; fill: var(--focus); }
#lines text.value { font-size: 11px; fill: var(--muted); cursor: default; }
#tooltip { position: fixed; pointer-events: none; background: rgba(29, 29, 31, 0.92); color: #fff;
  padding: 4px 8px; border-radius: 4px; font-size: 12px; z-index: 10; white-space: pre; }
#error { display: none; background: #ffe3e3; color: #a61e1e; padding: 8px 18px; }
.legend { display: flex; align-items: center; gap: 6px; font-size: 11px; color: var(--muted);
  margin-top: 8px; }
.legend canvas { border: 1px solid var(--line); }
</style>
</head>
<body>
<div id="error" role="alert"></div>
<header>
  <h1>__TITLE__</h1>
  <div class="controls">
    <label>Text <select id="text"></select></label>
    <span class="seg" id="kinds" role="group" aria-label="attention kind"></span>
    <label>Layer <select id="layer"></select></label>
    <label>Head <select id="head"></select></label>
    <label><input type="checkbox" id="sqrt" checked> square-root colours</label>
    <span id="hint">Hover a token or a cell; click to pin. Arrow keys: ←/→ head, ↑/↓ layer.</span>
  </div>
  <div id="sentence"></div>
</header>
<main>
  <section class="card"><h2 id="lines-title">Lines</h2><div id="lines"></div></section>
  <section class="card"><h2 id="heat-title">Heatmap</h2><div id="heatmap"></div>
    <div class="legend">
      <span>0</span><canvas id="legend" width="160" height="10"></canvas><span>1</span>
    </div>
  </section>
  <section class="card"><h2>Every layer × head (click to choose)</h2><div id="overview"></div></section>
</main>
<div id="tooltip" hidden></div>
<script type="application/json" id="attention-data">__DATA__</script>
<script>
"use strict";
(function () {
  const AVG = -1;
  const KIND_NAMES = {cross: "cross", decoder_self: "decoder self", encoder_self: "encoder self"};
  const KIND_AXES = {
    cross: ["target (query)", "source (key)"],
    decoder_self: ["target (query)", "decoder input (key)"],
    encoder_self: ["source (query)", "source (key)"],
  };
  // Viridis, sampled: perceptually uniform and readable when printed in grey.
  const VIRIDIS = [[68, 1, 84], [72, 40, 120], [62, 73, 137], [49, 104, 142], [38, 130, 142],
    [31, 158, 137], [53, 183, 121], [110, 206, 88], [181, 222, 43], [253, 231, 37]];
  const $ = (id) => document.getElementById(id);

  function showError(message) {
    const box = $("error");
    box.textContent = "Error: " + message;
    box.style.display = "block";
    document.body.dataset.error = String(message);
  }
  window.addEventListener("error", (event) => showError(event.message));

  const DATA = JSON.parse($("attention-data").textContent);
  const state = {item: 0, kind: null, layer: AVG, head: AVG, row: null, col: null, pinned: false};
  const cache = new Map();

  function item() { return DATA.items[state.item]; }
  function currentMap() { return item().maps[state.kind]; }
  function kindsOf(it) { return Object.keys(it.maps); }

  // The [rows x cols] matrix for one layer/head, AVG meaning the mean over that dimension.
  function matrix(m, layer, head) {
    const key = state.item + "|" + state.kind + "|" + layer + "|" + head;
    if (cache.has(key)) return cache.get(key);
    const [L, H, R, C] = m.shape;
    const layers = layer === AVG ? [...Array(L).keys()] : [layer];
    const heads = head === AVG ? [...Array(H).keys()] : [head];
    const out = new Float32Array(R * C);
    for (const l of layers) for (const h of heads) {
      const base = (l * H + h) * R * C;
      for (let i = 0; i < R * C; i++) out[i] += m.q[base + i];
    }
    const norm = DATA.scale * layers.length * heads.length;
    for (let i = 0; i < out.length; i++) out[i] /= norm;
    cache.set(key, out);
    return out;
  }

  function shade(v) { return $("sqrt").checked ? Math.sqrt(Math.max(v, 0)) : Math.max(v, 0); }
  function rgb(v) {
    const x = Math.min(1, shade(v)) * (VIRIDIS.length - 1);
    const i = Math.min(VIRIDIS.length - 2, Math.floor(x)), t = x - i;
    return VIRIDIS[i].map((a, k) => Math.round(a + (VIRIDIS[i + 1][k] - a) * t));
  }
  function color(v) { const c = rgb(v); return "rgb(" + c[0] + "," + c[1] + "," + c[2] + ")"; }
  function label(kind, layer, head, m) {
    const l = layer === AVG ? "average of layers" : "layer " + m.layers[layer];
    const h = head === AVG ? "average of heads" : "head " + m.heads[head];
    return KIND_NAMES[kind] + " · " + l + " · " + h;
  }
  function el(tag, className, text) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined) node.textContent = text;
    return node;
  }

  // ----- controls -----
  function fillTexts() {
    const select = $("text");
    DATA.items.forEach((it, i) => {
      const option = el("option", "", (i + 1) + ". " + (it.source || it.source_tokens.join(" ")));
      option.value = String(i);
      select.appendChild(option);
    });
    select.addEventListener("change", () => { state.item = Number(select.value); chooseKind(state.kind); });
  }

  function chooseKind(kind) {
    const kinds = kindsOf(item());
    state.kind = kinds.includes(kind) ? kind : (kinds[0] || null);
    state.row = state.col = null; state.pinned = false;
    const box = $("kinds");
    box.replaceChildren();
    for (const k of kinds) {
      const button = el("button", "", KIND_NAMES[k] || k);
      button.type = "button";
      button.setAttribute("aria-pressed", String(k === state.kind));
      button.addEventListener("click", () => chooseKind(k));
      box.appendChild(button);
    }
    if (state.kind) {
      const m = currentMap();
      if (state.layer >= m.shape[0]) state.layer = AVG;
      if (state.head >= m.shape[1]) state.head = AVG;
      fillSelect($("layer"), m.layers, "layer", state.layer);
      fillSelect($("head"), m.heads, "head", state.head);
    }
    render();
  }

  function fillSelect(select, indices, name, selected) {
    select.replaceChildren();
    const avg = el("option", "", "average of " + name + "s");
    avg.value = String(AVG);
    select.appendChild(avg);
    indices.forEach((index, position) => {
      const option = el("option", "", name + " " + index);
      option.value = String(position);
      select.appendChild(option);
    });
    select.value = String(selected);
  }

  function setFocus(row, col, pin) {
    if (state.pinned && !pin) return;
    if (pin) {
      const same = state.pinned && state.row === row && state.col === col;
      state.pinned = !same;
      if (same) { row = null; col = null; }
    }
    state.row = row; state.col = col;
    renderFocus();
  }

  // ----- sentence -----
  function renderSentence() {
    const box = $("sentence");
    box.replaceChildren();
    const it = item();
    for (const [name, text] of [["source", it.source], ["translation", it.translation]]) {
      const line = el("div");
      line.appendChild(el("span", "label", name));
      line.appendChild(el("span", "", text));
      box.appendChild(line);
    }
  }

  // ----- heatmap -----
  let heat = null;  // {rowLabels, colLabels, cells, R, C}
  function renderHeatmap() {
    const box = $("heatmap");
    box.replaceChildren();
    heat = null;
    if (!state.kind) {
      box.appendChild(el("p", "", "No attention maps were recorded for this text."));
      return;
    }
    const m = currentMap(), [, , R, C] = m.shape, values = matrix(m, state.layer, state.head);
    const cell = Math.max(13, Math.min(30, Math.floor(620 / Math.max(R, C, 1))));
    box.style.setProperty("--cell", cell + "px");
    box.style.setProperty("--font", Math.max(10, Math.min(14, cell - 4)) + "px");
    box.style.gridTemplateColumns = "auto repeat(" + C + ", var(--cell))";
    $("heat-title").textContent = "Heatmap: " + label(state.kind, state.layer, state.head, m) +
      "  (rows: " + KIND_AXES[state.kind][0] + ", columns: " + KIND_AXES[state.kind][1] + ")";
    box.appendChild(el("div"));
    const colLabels = m.cols.map((token, c) => {
      const node = el("div", "col", token);
      node.title = token + " (#" + c + ")";
      node.addEventListener("mouseenter", () => setFocus(null, c, false));
      node.addEventListener("click", () => setFocus(null, c, true));
      box.appendChild(node);
      return node;
    });
    const rowLabels = [], cells = [];
    for (let r = 0; r < R; r++) {
      const node = el("div", "row", m.rows[r]);
      node.title = m.rows[r] + " (#" + r + ")";
      node.addEventListener("mouseenter", () => setFocus(r, null, false));
      node.addEventListener("click", () => setFocus(r, null, true));
      box.appendChild(node);
      rowLabels.push(node);
      for (let c = 0; c < C; c++) {
        const square = el("div", "cell");
        square.style.background = color(values[r * C + c]);
        square.dataset.r = String(r); square.dataset.c = String(c);
        box.appendChild(square);
        cells.push(square);
      }
    }
    heat = {rowLabels, colLabels, cells, R, C};
  }

  // One listener for every cell: thousands of per-cell closures are slow to build for long sentences.
  function onHeatmapMove(event) {
    const target = event.target;
    if (!target.classList || !target.classList.contains("cell")) { hideTooltip(); return; }
    const r = Number(target.dataset.r), c = Number(target.dataset.c), m = currentMap();
    const v = matrix(m, state.layer, state.head)[r * m.shape[3] + c];
    showTooltip(event, m.rows[r] + " (#" + r + ")  →  " + m.cols[c] + " (#" + c + ")\n" +
      "attention " + v.toFixed(4));
    setFocus(r, c, false);
  }

  // ----- lines (BertViz-like) -----
  let lines = null;  // {left, right, values, paths, group, R, C}
  function renderLines() {
    const box = $("lines");
    box.replaceChildren();
    lines = null;
    if (!state.kind) return;
    const m = currentMap(), [, , R, C] = m.shape, values = matrix(m, state.layer, state.head);
    $("lines-title").textContent = "Lines: " + KIND_AXES[state.kind][0] + " → " + KIND_AXES[state.kind][1];
    const rowH = 20, top = 24, gap = 180;
    const textWidth = (tokens) => Math.min(220, 14 + 7.5 * Math.max(4, ...tokens.map((t) => t.length)));
    const [leftHead, rightHead] = KIND_AXES[state.kind];
    const leftW = Math.max(textWidth(m.rows), 7 * leftHead.length);
    const rightW = Math.max(textWidth(m.cols) + 44, 7 * rightHead.length);
    const width = leftW + gap + rightW, height = top + rowH * Math.max(R, C) + 8;
    // Parsing <svg> as HTML gives the SVG namespace without spelling its URI in the page.
    const holder = el("div");
    holder.innerHTML = '<svg width="' + width + '" height="' + height + '"></svg>';
    const svg = holder.firstChild, NS = svg.namespaceURI;
    const make = (tag, attrs) => {
      const node = document.createElementNS(NS, tag);
      for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, String(v));
      return node;
    };
    const heading = (x, anchor, text) => {
      const t = make("text", {x, y: 14, "text-anchor": anchor, fill: "#6e6e73"});
      t.textContent = text;
      t.style.fontSize = "11px";
      svg.appendChild(t);
    };
    heading(leftW - 6, "end", leftHead);
    heading(leftW + gap + 6, "start", rightHead);
    const x1 = leftW, x2 = leftW + gap, yOf = (i) => top + rowH * i + rowH / 2;
    const shadeBars = [];
    for (let c = 0; c < C; c++) {
      const bar = make("rect", {x: x2 + 2, y: yOf(c) - rowH / 2 + 1, width: rightW - 46, height: rowH - 2,
        rx: 3, fill: "#0a66c2", "fill-opacity": 0});
      svg.appendChild(bar);
      shadeBars.push(bar);
    }
    const group = make("g", {});
    svg.appendChild(group);
    const paths = [];
    for (let r = 0; r < R; r++) for (let c = 0; c < C; c++) {
      const line = make("line", {x1: x1 + 4, y1: yOf(r), x2: x2 - 4, y2: yOf(c), stroke: "#0a66c2",
        "stroke-width": 2, "stroke-linecap": "round"});
      group.appendChild(line);
      paths.push(line);
    }
    const token = (x, y, anchor, text, onEnter, onClick) => {
      const t = make("text", {x, y: y + 4, "text-anchor": anchor});
      t.textContent = text;
      t.addEventListener("mouseenter", onEnter);
      t.addEventListener("click", onClick);
      svg.appendChild(t);
      return t;
    };
    const left = m.rows.map((tok, r) => token(x1 - 6, yOf(r), "end", tok,
      () => setFocus(r, null, false), () => setFocus(r, null, true)));
    const right = m.cols.map((tok, c) => token(x2 + 6, yOf(c), "start", tok,
      () => setFocus(null, c, false), () => setFocus(null, c, true)));
    const numbers = m.cols.map((_, c) => {
      const t = make("text", {x: width - 4, y: yOf(c) + 4, "text-anchor": "end", class: "value"});
      svg.appendChild(t);
      return t;
    });
    svg.addEventListener("mouseleave", () => setFocus(null, null, false));
    box.appendChild(svg);
    lines = {left, right, numbers, shadeBars, values, paths, R, C};
  }

  // ----- focus: what the mouse (or a pinned click) points at -----
  function renderFocus() {
    const {row, col} = state;
    if (heat) {
      heat.rowLabels.forEach((n, r) => n.classList.toggle("focus", r === row));
      heat.colLabels.forEach((n, c) => {
        n.classList.toggle("focus", c === col);
        // The row's attention over the columns, as brightness behind the column labels.
        const v = row === null ? 0 : matrix(currentMap(), state.layer, state.head)[row * heat.C + c];
        n.style.background = row === null ? "" : "rgba(232, 89, 12, " + (0.85 * shade(v)).toFixed(3) + ")";
      });
      heat.cells.forEach((n, i) => {
        const r = Math.floor(i / heat.C), c = i % heat.C;
        n.classList.toggle("cross", (row !== null && r === row) || (col !== null && c === col));
      });
    }
    if (lines) {
      const {values, paths, R, C} = lines;
      for (let r = 0; r < R; r++) for (let c = 0; c < C; c++) {
        const v = values[r * C + c], line = paths[r * C + c];
        const shown = row === null && col === null ? true : (row !== null ? r === row : c === col);
        // Unfocused opacity is linear (as in BertViz) so that only the strong links stand out of the tangle.
        const alpha = !shown ? 0 : (row === null && col === null ? 0.8 * v : shade(v));
        line.setAttribute("stroke-opacity", alpha.toFixed(3));
        line.setAttribute("stroke", row === null && col === null ? "#0a66c2" : "#e8590c");
      }
      lines.left.forEach((n, r) => n.classList.toggle("focus", r === row));
      lines.right.forEach((n, c) => n.classList.toggle("focus", c === col));
      lines.shadeBars.forEach((bar, c) => {
        const v = row === null ? 0 : values[row * C + c];
        bar.setAttribute("fill-opacity", (0.55 * shade(v)).toFixed(3));
      });
      lines.numbers.forEach((n, c) => {
        n.textContent = row === null ? "" : values[row * C + c].toFixed(2);
      });
    }
  }

  // ----- overview: every layer x head, plus the averages -----
  function renderOverview() {
    const box = $("overview");
    box.replaceChildren();
    if (!state.kind) return;
    const m = currentMap(), [L, H, R, C] = m.shape;
    const px = Math.max(1, Math.floor(64 / Math.max(R, C, 1)));
    box.style.gridTemplateColumns = "auto repeat(" + (H + 1) + ", max-content)";
    box.appendChild(el("div"));
    m.heads.forEach((h) => box.appendChild(el("div", "ax", "head " + h)));
    box.appendChild(el("div", "ax", "avg heads"));
    const layerRows = [...Array(L).keys()].concat([AVG]);
    for (const l of layerRows) {
      box.appendChild(el("div", "ax", l === AVG ? "avg layers" : "layer " + m.layers[l]));
      for (const h of [...Array(H).keys()].concat([AVG])) {
        // One pixel per weight, enlarged by CSS: a single putImageData instead of R x C fillRect calls.
        const canvas = document.createElement("canvas");
        canvas.width = Math.max(C, 1); canvas.height = Math.max(R, 1);
        canvas.style.width = C * px + "px"; canvas.style.height = R * px + "px";
        const ctx = canvas.getContext("2d"), values = matrix(m, l, h);
        const image = ctx.createImageData(canvas.width, canvas.height);
        for (let i = 0; i < R * C; i++) {
          const c = rgb(values[i]);
          image.data.set([c[0], c[1], c[2], 255], 4 * i);
        }
        ctx.putImageData(image, 0, 0);
        canvas.title = label(state.kind, l, h, m);
        canvas.classList.toggle("selected", l === state.layer && h === state.head);
        canvas.addEventListener("click", () => {
          state.layer = l; state.head = h;
          $("layer").value = String(l); $("head").value = String(h);
          render();
        });
        box.appendChild(canvas);
      }
    }
  }

  function renderLegend() {
    const canvas = $("legend"), ctx = canvas.getContext("2d");
    for (let x = 0; x < canvas.width; x++) {
      ctx.fillStyle = color(x / (canvas.width - 1));
      ctx.fillRect(x, 0, 1, canvas.height);
    }
  }

  function showTooltip(event, text) {
    const tip = $("tooltip");
    tip.textContent = text;
    tip.hidden = false;
    tip.style.left = (event.clientX + 14) + "px";
    tip.style.top = (event.clientY + 14) + "px";
  }
  function hideTooltip() { $("tooltip").hidden = true; }

  function render() {
    renderSentence();
    renderHeatmap();
    renderLines();
    renderOverview();
    renderLegend();
    renderFocus();
  }

  function step(select, delta) {
    const options = [...select.options].map((o) => Number(o.value));
    const next = options[(options.indexOf(Number(select.value)) + delta + options.length) % options.length];
    select.value = String(next);
    select.dispatchEvent(new Event("change"));
  }

  // "#text=2&kind=encoder_self&layer=1&head=0&row=3" opens that view (1-based text, model layer/head
  // indices, 0-based row pinned): handy for bookmarks and for screenshots of a given state.
  function applyHash() {
    const params = new URLSearchParams(location.hash.replace(/^#/, ""));
    const text = Number(params.get("text"));
    if (Number.isInteger(text) && text >= 1 && text <= DATA.items.length) {
      state.item = text - 1;
      $("text").value = String(state.item);
    }
    const kinds = kindsOf(item());
    const kind = params.get("kind");
    state.kind = kinds.includes(kind) ? kind : (kinds.includes("cross") ? "cross" : kinds[0]);
    if (state.kind) {
      const m = currentMap();
      const layer = m.layers.indexOf(Number(params.get("layer")));
      const head = m.heads.indexOf(Number(params.get("head")));
      state.layer = params.has("layer") && layer >= 0 ? layer : AVG;
      state.head = params.has("head") && head >= 0 ? head : AVG;
    }
    chooseKind(state.kind);
    const row = Number(params.get("row"));
    const rows = state.kind ? currentMap().shape[2] : 0;
    if (params.has("row") && Number.isInteger(row) && row >= 0 && row < rows) {
      setFocus(row, null, true);
    }
  }

  function init() {
    if (!DATA.items.length) { showError("this file holds no translations"); return; }
    fillTexts();
    $("layer").addEventListener("change", () => { state.layer = Number($("layer").value); render(); });
    $("head").addEventListener("change", () => { state.head = Number($("head").value); render(); });
    $("sqrt").addEventListener("change", () => render());
    const heatmap = $("heatmap");
    heatmap.addEventListener("mousemove", onHeatmapMove);
    heatmap.addEventListener("mouseleave", () => { hideTooltip(); setFocus(null, null, false); });
    heatmap.addEventListener("click", (event) => {
      const t = event.target;
      if (t.classList && t.classList.contains("cell")) {
        setFocus(Number(t.dataset.r), Number(t.dataset.c), true);
      }
    });
    document.addEventListener("keydown", (event) => {
      if (event.target instanceof HTMLSelectElement) return;
      const moves = {ArrowLeft: ["head", -1], ArrowRight: ["head", 1], ArrowUp: ["layer", -1],
        ArrowDown: ["layer", 1]};
      if (moves[event.key] && state.kind) {
        event.preventDefault();
        step($(moves[event.key][0]), moves[event.key][1]);
      }
    });
    applyHash();
    document.body.dataset.ready = "1";
  }

  try {
    init();
  } catch (error) {
    showError(error && error.message ? error.message : String(error));
    throw error;
  }
})();
</script>
</body>
</html>
"""
