// attncap explorer: draws the maps embedded in this page (see attncap/viz/explorer.py for the data).
//
// Test API, set once the maps are unpacked:
//   window.attncap = {words(), steps(), layers(), select(word), setStep(step), setLayer(name),
//                     probe(y, x), ...}
//   probe(y, x): y, x fractions of the picture's height and width -> {word: weight} at that position,
//   for the current step, layer, head, CFG branch and frame: the stored map's row, each word the mean
//   of its tokens' columns, dequantised (within scale / 510 of the stored value).
"use strict";
(function () {
  const D = JSON.parse(document.getElementById("attncap-data").textContent);
  const $ = (id) => document.getElementById(id);
  const LUT = D.lut;
  const ALL = "all layers";

  // ---------------------------------------------------------------- data
  async function inflate(b64) {
    const bin = atob(b64);
    const bytes = new Uint8Array(bin.length);
    for (let i = 0; i < bin.length; i++) bytes[i] = bin.charCodeAt(i);
    const stream = new Blob([bytes]).stream().pipeThrough(new DecompressionStream("deflate"));
    return new Uint8Array(await new Response(stream).arrayBuffer());
  }
  const key = (layer, step, branch) => layer + "|" + step + "|" + String(branch);
  function index(entries, buf, n, scales) {
    const out = new Map();
    for (const e of entries || []) {
      e.q = new Uint8Array(buf.buffer, e.data, n(e));
      e.s = new Float32Array(buf.buffer, e.scale, scales(e));
      out.set(key(e.layer, e.step, e.branch), e);
    }
    return out;
  }
  const prod = (g) => g.reduce((a, b) => a * b, 1);
  // flat bin of a point (fractions of t, y, x) in a (t,) h, w grid: as attncap.analysis.bin_of
  function binOf(point, grid) {
    const p = point.slice(point.length - grid.length);
    let flat = 0;
    grid.forEach((n, i) => { flat = flat * n + Math.min(n - 1, Math.max(0, Math.floor(p[i] * n))); });
    return flat;
  }
  const fmt = (v) => (v === 0 ? "0" : Math.abs(v) >= 0.01 ? v.toFixed(3) : v.toExponential(2));

  // ---------------------------------------------------------------- state
  const S = { word: 0, step: 0, layer: (D.layers || [])[0], head: "mean", branch: (D.branches || [])[0],
              frame: 0, opacity: 0.65, scale: "map", selfPoint: null, selfLayer: (D.selfLayers || [])[0],
              genStep: 0, genLayer: null, hover: null, playing: null, genPlaying: null };
  let TEXT = new Map(), SELF = new Map(), GEN = new Map();
  const stepList = D.steps.map((s) => s.step);
  const words = D.words || [];

  function textEntry(layer, step, branch) { return TEXT.get(key(layer, step, branch)); }
  function selfEntry(step) {
    return SELF.get(key(S.selfLayer, step, S.branch)) ||
      (D.branches || []).map((b) => SELF.get(key(S.selfLayer, step, b))).find(Boolean);
  }
  function headsOf(e) {
    if (!e || S.head === "mean" || !e.heads) return [...Array(e ? e.G : 1).keys()];
    const g = e.heads.indexOf(Number(S.head));
    return g < 0 ? [...Array(e.G).keys()] : [g];
  }
  // [Q] values of word wi in entry e over the selected heads
  function wordValues(e, wi) {
    const hs = headsOf(e), out = new Float32Array(e.Q);
    for (const g of hs) {
      const sc = e.s[g * e.W + wi] / 255, base = g * e.Q * e.W;
      for (let i = 0; i < e.Q; i++) out[i] += e.q[base + i * e.W + wi] * sc;
    }
    for (let i = 0; i < e.Q; i++) out[i] /= hs.length;
    return out;
  }
  function probeAt(e, point) {
    const bin = binOf(point, e.grid), hs = headsOf(e), out = {};
    words.forEach((w, wi) => {
      let v = 0;
      for (const g of hs) v += e.q[(g * e.Q + bin) * e.W + wi] * e.s[g * e.W + wi] / 255;
      out[w.label] = v / hs.length;
    });
    return out;
  }
  // the (t) fraction of the current frame for video grids
  function framePoint(grid, y, x) {
    if (grid.length < 3) return [y, x];
    const n = D.frames && D.frames.length ? D.frameCount : grid[0];
    const orig = D.frames && D.frames.length ? D.frameIndex[S.frame] : S.frame;
    return [(Math.min(grid[0] - 1, Math.floor(orig * grid[0] / n)) + 0.5) / grid[0], y, x];
  }
  // one frame [h, w] of a map over a (t,) h, w grid
  function frameSlice(vals, grid, y0) {
    if (grid.length < 3) return vals;
    const hw = grid[1] * grid[2], t = binOf([y0, 0, 0], [grid[0], 1, 1]);
    return vals.subarray(t * hw, (t + 1) * hw);
  }

  // ---------------------------------------------------------------- drawing
  const images = {};
  function picture(i) {
    const src = D.frames && D.frames.length ? D.frames[i] : D.image;
    if (!src) return null;
    if (!images[src]) { images[src] = new Image(); images[src].onload = redraw; images[src].src = src; }
    return images[src].complete && images[src].naturalWidth ? images[src] : null;
  }
  function canvasSize(grid) {
    const [h, w] = D.imageSize || grid.slice(-2);
    const side = Math.max(h, w), target = Math.min(640, Math.max(384, side));
    return [Math.round(h * target / side), Math.round(w * target / side)];
  }
  function mapCanvas(vals, h, w, vmax) {
    const c = document.createElement("canvas");
    c.width = w; c.height = h;
    const ctx = c.getContext("2d"), img = ctx.createImageData(w, h);
    for (let i = 0; i < h * w; i++) {
      const k = vmax > 0 ? Math.max(0, Math.min(255, Math.round(vals[i] / vmax * 255))) : 0, col = LUT[k];
      img.data[4 * i] = col[0]; img.data[4 * i + 1] = col[1]; img.data[4 * i + 2] = col[2]; img.data[4 * i + 3] = 255;
    }
    ctx.putImageData(img, 0, 0);
    return c;
  }
  // the picture (or black), the map over it with the page's opacity, an optional marker
  function paint(canvas, vals, grid, vmax, marker) {
    const [H, W] = canvasSize(grid);
    if (canvas.width !== W || canvas.height !== H) { canvas.width = W; canvas.height = H; canvas.parentElement.style.width = W + "px"; }
    const ctx = canvas.getContext("2d"), pic = picture(S.frame);
    ctx.fillStyle = "#000"; ctx.fillRect(0, 0, W, H);
    if (pic) {
      ctx.imageSmoothingEnabled = W < 2 * pic.naturalWidth;   // a tiny picture shows its pixels
      ctx.drawImage(pic, 0, 0, W, H);
    }
    if (vals) {
      ctx.globalAlpha = pic ? S.opacity : 1;
      ctx.imageSmoothingEnabled = true;
      ctx.drawImage(mapCanvas(vals, grid[grid.length - 2], grid[grid.length - 1], vmax), 0, 0, W, H);
      ctx.globalAlpha = 1;
    }
    if (marker) {
      const y = marker[0] * H, x = marker[1] * W;
      ctx.strokeStyle = "#00e5ff"; ctx.lineWidth = 2;
      ctx.beginPath(); ctx.moveTo(x - 9, y); ctx.lineTo(x + 9, y); ctx.moveTo(x, y - 9); ctx.lineTo(x, y + 9); ctx.stroke();
    }
  }
  function colorbar(canvasId, ticksId, vmax, unit) {
    const c = $(canvasId), ctx = c.getContext("2d"), img = ctx.createImageData(256, c.height);
    for (let x = 0; x < 256; x++) for (let y = 0; y < c.height; y++) {
      const o = 4 * (y * 256 + x); img.data[o] = LUT[x][0]; img.data[o + 1] = LUT[x][1]; img.data[o + 2] = LUT[x][2]; img.data[o + 3] = 255;
    }
    ctx.putImageData(img, 0, 0);
    $(ticksId).innerHTML = [0, 0.5, 1].map((f) => `<span style="left:${f * 100}%">${fmt(f * vmax)}</span>`).join("") ;
    $(ticksId.replace("ticks", "unit")).textContent = unit;
  }
  const maxOf = (v) => v.reduce((a, b) => (b > a ? b : a), 0);
  const stepText = (s) => { const t = D.steps.find((x) => x.step === s); return "step " + s + (t && t.timestep != null ? ` (t = ${+t.timestep.toPrecision(4)})` : ""); };
  // as attncap.viz.core.short_layer: "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2" -> "down1.a0.t0.attn2"
  const SHORT = [["down_blocks.", "down"], ["up_blocks.", "up"], ["mid_block", "mid"], ["attentions.", "a"],
                 ["single_transformer_blocks.", "st"], ["transformer_blocks.", "t"], ["blocks.", "b"]];
  const short = (name) => SHORT.reduce((s, [a, b]) => s.split(a).join(b), String(name).replace(/^(unet|transformer_2|transformer)\./, ""));
  const rel = (r) => String(r).replace("->", "\u2192");

  function drawMain() {
    if (!words.length) return;
    const e = textEntry(S.layer, S.step, S.branch), canvas = $("main");
    const w = words[S.word];
    if (!e) {
      paint(canvas, null, [1, 1], 0);
      $("caption").textContent = `no record of ${short(S.layer)} at ${stepText(S.step)}, branch ${S.branch}`;
      return;
    }
    const all = wordValues(e, S.word), grid = e.grid;
    const tf = grid.length === 3 ? framePoint(grid, 0, 0)[0] : 0;
    const vals = frameSlice(all, grid, tf);
    let vmax = maxOf(vals);
    if (S.scale === "steps") {
      vmax = 0;
      for (const s of stepList) { const o = textEntry(S.layer, s, S.branch); if (o) vmax = Math.max(vmax, maxOf(wordValues(o, S.word))); }
    }
    paint(canvas, vals, grid, vmax, S.selfPoint);
    colorbar("colorbar", "ticks", vmax, S.scale === "steps" ? "attention weight (scale: this word and layer over all steps)" : "attention weight (scale: this map)");
    const head = S.head === "mean" ? (e.heads ? "mean of heads " + e.heads.join(",") : "head mean") : "head " + S.head;
    $("caption").innerHTML = `<b>${esc(w.text)}</b>${w.occurrence > 1 ? " (occurrence " + w.occurrence + ")" : ""} · ` +
      `${esc(short(S.layer))} · ${rel(e.relation)} · ${stepText(S.step)}` + (S.branch != null ? ` · ${S.branch}` : "") +
      ` · ${head} · grid ${grid.join("×")}` + (grid.length === 3 ? ` · map frame ${Math.round(tf * grid[0] - 0.5)}` : "");
    drawBars();
  }
  function drawBars() {
    const e = textEntry(S.layer, S.step, S.branch);
    if (!S.hover || !e) return;
    const p = probeAt(e, framePoint(e.grid, S.hover[0], S.hover[1])), vmax = Math.max(1e-12, ...Object.values(p));
    $("bars").innerHTML = `<div class="hint">position (y ${S.hover[0].toFixed(2)}, x ${S.hover[1].toFixed(2)}):</div>` +
      words.map((w, i) => `<div class="bar${i === S.word ? " on" : ""}"><span class="name" title="${esc(w.label)}">${esc(w.label)}</span>` +
        `<span class="track"><span class="fill" style="display:block;width:${(100 * p[w.label] / vmax).toFixed(1)}%"></span></span>` +
        `<span class="num">${fmt(p[w.label])}</span></div>`).join("");
  }
  function selfRow(point) {
    const e = selfEntry(S.step);
    if (!e) return null;
    const row = binOf(framePoint(e.qgrid, point[0], point[1]), e.qgrid), K = prod(e.kgrid), sc = e.s[row] / 255;
    const vals = new Float32Array(K);
    for (let k = 0; k < K; k++) vals[k] = e.q[row * K + k] * sc;
    return { entry: e, values: vals };
  }
  function drawSelf() {
    if (!D.self.length) return;
    const point = S.selfPoint || [0.5, 0.5], r = selfRow(point);
    if (!r) { paint($("self"), null, [1, 1], 0); $("self-caption").textContent = `no self-attention record at ${stepText(S.step)}`; return; }
    const g = r.entry.kgrid, vals = frameSlice(r.values, g, g.length === 3 ? framePoint(g, 0, 0)[0] : 0), vmax = maxOf(vals);
    paint($("self"), vals, g, vmax, point);
    colorbar("self-colorbar", "self-ticks", vmax, "attention weight");
    $("self-caption").innerHTML = `where (y ${point[0].toFixed(2)}, x ${point[1].toFixed(2)}) attends · ${esc(short(S.selfLayer))} · ` +
      `${rel(r.entry.relation)} · ${stepText(S.step)}` + (r.entry.branch != null ? ` · ${r.entry.branch}` : "") + ` · grid ${g.join("×")}`;
    $("self-note").textContent = S.selfPoint ? "" : "Showing the centre; click the picture above to choose a position.";
  }
  function drawGen() {
    const G = D.generation;
    if (!G) return;
    const s = G.steps[S.genStep], e = GEN.get(key(S.genLayer, s, S.branch)) ||
      [...GEN.values()].find((x) => x.layer === S.genLayer && x.step === s);
    $("gen-label").textContent = `${S.genStep + 1} / ${G.steps.length}`;
    document.querySelectorAll("#gen-tokens .chip").forEach((c, i) => c.classList.toggle("on", i === S.genStep));
    if (!e) { paint($("gen"), null, [1, 1], 0); $("gen-caption").textContent = "no record for this token and layer"; return; }
    const K = prod(e.kgrid), vals = new Float32Array(K);
    for (let k = 0; k < K; k++) vals[k] = e.q[k] * e.s[0] / 255;
    const v = frameSlice(vals, e.kgrid, 0), vmax = maxOf(v);
    paint($("gen"), v, e.kgrid, vmax);
    colorbar("gen-colorbar", "gen-ticks", vmax, "attention weight");
    $("gen-caption").innerHTML = `token ${s}: <b>${esc(JSON.stringify(G.tokens[S.genStep]))}</b> · ${esc(short(S.genLayer))} · ` +
      `${rel(G.relation)} · ${(100 * e.mass).toFixed(1)}% of its attention on the picture`;
  }
  function redraw() { drawMain(); drawSelf(); drawGen(); syncControls(); }
  const esc = (t) => String(t).replace(/[&<>"]/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;" }[c]));

  // ---------------------------------------------------------------- controls
  function options(sel, items, label) {
    sel.innerHTML = items.map((v) => `<option value="${esc(v)}">${esc(label ? label(v) : v)}</option>`).join("");
  }
  function syncControls() {
    if (!words.length) return;
    document.querySelectorAll("#chips .chip").forEach((c, i) => c.classList.toggle("on", i === S.word));
    $("step").value = stepList.indexOf(S.step);
    $("step-label").textContent = stepText(S.step);
    $("layer").value = S.layer;
    const e = textEntry(S.layer, S.step, S.branch), heads = e && e.heads ? e.heads : [];
    const want = ["mean", ...heads.map(String)];
    if ([...$("head").options].map((o) => o.value).join() !== want.join()) options($("head"), want, (h) => (h === "mean" ? "mean of heads" : "head " + h));
    if (!want.includes(String(S.head))) S.head = "mean";
    $("head").value = String(S.head);
    $("head").disabled = heads.length === 0;
    $("branch").value = String(S.branch);
    $("opacity").value = Math.round(S.opacity * 100);
    $("opacity-label").textContent = Math.round(S.opacity * 100) + "%";
    $("frame").value = S.frame;
    const grid = e ? e.grid : [];
    $("frame-label").textContent = D.frames && D.frames.length ? `frame ${D.frameIndex[S.frame]} of ${D.frameCount}` : `map frame ${S.frame}`;
    if (grid.length !== 3 && !(D.frames && D.frames.length)) $("frame-row").hidden = true;
  }
  function setup() {
    $("title").textContent = D.title;
    $("prompt").textContent = D.prompt || "";
    $("meta").textContent = Object.entries(D.meta).map(([k, v]) => `${k}: ${v}`).join(" · ") + (D.pool > 1 ? ` · maps pooled ${D.pool}×${D.pool} for this page` : "");
    document.title = D.title;
    if (words.length) {
      $("maps-section").hidden = false;
      $("chips").innerHTML = words.map((w, i) => `<button type="button" class="chip" data-i="${i}" title="keys ${w.keys.join(",")}">` +
        `${esc(w.text)}${w.occurrence > 1 ? `<small>#${w.occurrence}</small>` : ""}${w.pieces.length ? `<small>${esc(w.pieces.join("|"))}</small>` : ""}</button>`).join("");
      $("chips").onclick = (ev) => { const b = ev.target.closest(".chip"); if (b) { S.word = +b.dataset.i; redraw(); } };
      $("step").max = stepList.length - 1;
      $("step").oninput = () => { S.step = stepList[+$("step").value]; redraw(); };
      $("play").onclick = () => togglePlay();
      options($("layer"), D.layers, (l) => (l === ALL ? "all layers (mean, resized to the largest grid)" : short(l)));
      $("layer").onchange = () => { S.layer = $("layer").value; redraw(); };
      $("head").onchange = () => { S.head = $("head").value; redraw(); };
      $("head-row").hidden = !D.text.some((e) => e.heads);
      options($("branch"), D.branches.map(String), (b) => (b === "null" ? "(one call)" : b));
      $("branch-row").hidden = D.branches.length < 2;
      $("branch").onchange = () => { S.branch = D.branches[$("branch").selectedIndex]; redraw(); };
      const video = D.text.some((e) => e.grid.length === 3);
      if (video) {
        $("frame-row").hidden = false;
        $("frame").max = D.frames && D.frames.length ? D.frames.length - 1 : Math.max(...D.text.map((e) => (e.grid.length === 3 ? e.grid[0] : 1))) - 1;
        $("frame").oninput = () => { S.frame = +$("frame").value; redraw(); };
      }
      $("opacity").oninput = () => { S.opacity = $("opacity").value / 100; redraw(); };
      $("scale").onchange = () => { S.scale = $("scale").value; redraw(); };
      const at = (ev) => { const r = $("main").getBoundingClientRect(); return [(ev.clientY - r.top) / r.height, (ev.clientX - r.left) / r.width]; };
      $("main").onmousemove = (ev) => { S.hover = at(ev); drawBars(); };
      $("main").onclick = (ev) => { S.selfPoint = at(ev); redraw(); };
      if (!D.self.length) $("bars").insertAdjacentHTML("afterend", '<div class="hint">No image→image maps were captured, so clicking shows no self-attention (capture relations="image->text,image->image").</div>');
    }
    if (D.self.length) {
      $("self-section").hidden = false;
      options($("self-layer"), D.selfLayers, (l) => (l === ALL ? "all self-attention layers (mean)" : short(l)));
      $("self-layer").onchange = () => { S.selfLayer = $("self-layer").value; drawSelf(); };
      if (!words.length) $("self").onclick = (ev) => { const r = $("self").getBoundingClientRect(); S.selfPoint = [(ev.clientY - r.top) / r.height, (ev.clientX - r.left) / r.width]; drawSelf(); };
    }
    const G = D.generation;
    if (G) {
      $("gen-section").hidden = false;
      S.genLayer = G.layers[0];
      options($("gen-layer"), G.layers, (l) => (l === ALL ? "all layers (mean)" : short(l)));
      $("gen-layer").onchange = () => { S.genLayer = $("gen-layer").value; drawGen(); };
      $("gen-step").max = G.steps.length - 1;
      $("gen-step").oninput = () => { S.genStep = +$("gen-step").value; drawGen(); };
      const mass = G.steps.map((s) => { const e = GEN.get(key(G.layers[0], s, S.branch)) || [...GEN.values()].find((x) => x.layer === G.layers[0] && x.step === s); return e ? e.mass : 0; });
      const mmax = Math.max(1e-12, ...mass);
      $("gen-tokens").innerHTML = G.tokens.map((t, i) => {
        const c = LUT[Math.round(255 * mass[i] / mmax)], lum = 0.299 * c[0] + 0.587 * c[1] + 0.114 * c[2];
        return `<button type="button" class="chip gen" data-i="${i}" title="${(100 * mass[i]).toFixed(1)}% on the picture" ` +
          `style="background:rgb(${c.join(",")});color:${lum > 110 ? "#000" : "#fff"}">${esc(t.replace(/\n/g, "\u21b5")) || "&nbsp;"}</button>`;
      }).join("");
      $("gen-tokens").onclick = (ev) => { const b = ev.target.closest(".chip"); if (b) { S.genStep = +b.dataset.i; $("gen-step").value = S.genStep; drawGen(); } };
      $("gen-play").onclick = () => {
        if (S.genPlaying) { clearInterval(S.genPlaying); S.genPlaying = null; $("gen-play").innerHTML = "&#9654;"; return; }
        $("gen-play").innerHTML = "&#10074;&#10074;";
        S.genPlaying = setInterval(() => { S.genStep = (S.genStep + 1) % G.steps.length; $("gen-step").value = S.genStep; drawGen(); }, 600);
      };
    }
    document.addEventListener("keydown", (ev) => {
      if (ev.target.tagName === "SELECT" || ev.target.tagName === "INPUT" || !stepList.length) return;
      const i = stepList.indexOf(S.step);
      if (ev.key === "ArrowRight") { S.step = stepList[Math.min(stepList.length - 1, i + 1)]; redraw(); }
      if (ev.key === "ArrowLeft") { S.step = stepList[Math.max(0, i - 1)]; redraw(); }
    });
  }
  function togglePlay() {
    if (S.playing) { clearInterval(S.playing); S.playing = null; $("play").innerHTML = "&#9654;"; return; }
    $("play").innerHTML = "&#10074;&#10074;";
    S.playing = setInterval(() => { S.step = stepList[(stepList.indexOf(S.step) + 1) % stepList.length]; redraw(); }, 500);
  }

  function need(cond, what) { if (!cond) throw new Error(what); }
  const api = {
    words: () => words.map((w) => w.label),
    steps: () => stepList.slice(),
    layers: () => (D.layers || []).slice(),
    branches: () => (D.branches || []).slice(),
    heads: () => { const e = textEntry(S.layer, S.step, S.branch); return e && e.heads ? e.heads.slice() : []; },
    select(word) { const i = words.findIndex((w) => w.label === word); need(i >= 0, `no word ${JSON.stringify(word)}; words: ${api.words().join(", ")}`); S.word = i; redraw(); },
    setStep(step) { need(stepList.includes(step), `no step ${step}; steps: ${stepList.join(", ")}`); S.step = step; redraw(); },
    setLayer(name) { need(D.layers.includes(name), `no layer ${JSON.stringify(name)}; layers: ${D.layers.join(", ")}`); S.layer = name; redraw(); },
    setHead(h) { S.head = h === "mean" ? "mean" : Number(h); redraw(); },
    setBranch(b) { need(D.branches.includes(b), `no branch ${b}; branches: ${D.branches.join(", ")}`); S.branch = b; redraw(); },
    setFrame(f) { S.frame = f; redraw(); },
    setOpacity(a) { S.opacity = a; redraw(); },
    probe(y, x) { const e = textEntry(S.layer, S.step, S.branch); need(e, "no text map at this step, layer and branch"); return probeAt(e, framePoint(e.grid, y, x)); },
    click(y, x) { S.selfPoint = [y, x]; redraw(); },
    selfAt(y, x) { const r = selfRow([y, x]); return r ? { layer: r.entry.layer, grid: r.entry.kgrid, values: Array.from(r.values) } : null; },
    generated: () => (D.generation ? D.generation.tokens.slice() : []),
    setToken(i) { S.genStep = i; $("gen-step").value = i; drawGen(); },
    state: () => ({ word: words[S.word] && words[S.word].label, step: S.step, layer: S.layer, head: S.head, branch: S.branch, frame: S.frame }),
  };

  inflate(document.getElementById("attncap-blob").textContent.trim()).then((buf) => {
    TEXT = index(D.text, buf, (e) => e.G * e.Q * e.W, (e) => e.G * e.W);
    SELF = index(D.self, buf, (e) => prod(e.qgrid) * prod(e.kgrid), (e) => prod(e.qgrid));
    GEN = index(D.generation ? D.generation.entries : [], buf, (e) => prod(e.kgrid), () => 1);
    if (!stepList.length && D.generation) S.genStep = 0;
    S.step = stepList[0];
    setup();
    $("loading").hidden = true;
    $("app").hidden = false;
    redraw();
    window.attncap = api;
  }).catch((err) => { $("loading").textContent = "Could not unpack the maps: " + err; throw err; });
})();
