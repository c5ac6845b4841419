// pneumoscan page: upload an X-ray, show the model's answer, its warnings and its Grad-CAM
// overlay; a threshold slider re-labels the answer from its probability without a new request,
// showing the validation sensitivity/specificity at that threshold (/v1/model operating_curve).
// Plain browser JavaScript, no external assets; talks only to this server's /v1 API.
"use strict";

(function () {
  const $ = (id) => document.getElementById(id);
  const KEY_STORE = "pneumoscan.apiKey";
  const BROWSER_IMAGE_TYPES = ["image/jpeg", "image/png"];
  const CURVE_STEP = 0.005;
  const state = { key: sessionStorage.getItem(KEY_STORE) || "", model: null, objectUrl: null, pending: null, busy: false,
                  thresholds: [], result: null };

  // ------------------------------------------------------------------ helpers
  function authHeaders() {
    return state.key ? { "X-API-Key": state.key } : {};
  }

  async function api(path, options) {
    const opts = Object.assign({}, options || {});
    opts.headers = Object.assign({}, authHeaders(), opts.headers || {});
    let response;
    try {
      response = await fetch(path, opts);
    } catch (err) {
      return { status: 0, ok: false, body: { error: "network", detail: "cannot reach the pneumoscan server" } };
    }
    let body = null;
    try { body = await response.json(); } catch (err) { body = null; }
    return { status: response.status, ok: response.ok, body: body };
  }

  function pct(x, digits) {
    return (100 * x).toFixed(digits === undefined ? 1 : digits) + " %";
  }

  function fmtNum(x, digits) {
    return (typeof x === "number" && isFinite(x)) ? x.toFixed(digits) : "–";
  }

  function fmtBytes(n) {
    if (n >= 1e6) return (n / 1e6).toFixed(1) + " MB";
    if (n >= 1e3) return (n / 1e3).toFixed(0) + " kB";
    return n + " B";
  }

  function show(el, on) { el.classList.toggle("hidden", !on); }

  function setStatus(kind, text) {
    const s = $("server-status");
    s.classList.remove("ok", "bad");
    if (kind) s.classList.add(kind);
    $("server-status-text").textContent = text;
  }

  function addFact(dl, label, value, asCode) {
    const dt = document.createElement("dt");
    dt.textContent = label;
    const dd = document.createElement("dd");
    if (asCode) {
      const c = document.createElement("code");
      c.textContent = value;
      dd.appendChild(c);
    } else {
      dd.textContent = value;
    }
    dl.appendChild(dt);
    dl.appendChild(dd);
  }

  // ------------------------------------------------------------------ model
  async function loadModel() {
    const r = await api("/v1/model");
    if (r.status === 401) {
      show($("key-card"), true);
      setStatus("bad", "API key required");
      const dl = $("model-facts");
      dl.replaceChildren();
      addFact(dl, "Status", "enter the API key to continue");
      if (state.key) showError("The API key was not accepted.");
      return false;
    }
    if (!r.ok || !r.body) {
      setStatus("bad", "server unavailable");
      showError((r.body && r.body.detail) || "The server did not answer.");
      return false;
    }
    state.model = r.body;
    show($("key-card"), false);
    hideError();
    renderModel(r.body);
    setStatus("ok", "ready");
    return true;
  }

  function renderModel(m) {
    const dl = $("model-facts");
    dl.replaceChildren();
    addFact(dl, "Model", m.name);
    if (m.model_name) addFact(dl, "Architecture", m.model_name + " · " + m.input_size + "×" + m.input_size + " px");
    if (m.sha256) addFact(dl, "Weights sha256", m.sha256.slice(0, 16) + "…", true);
    const op = m.operating_point || {};
    if (typeof op.threshold === "number") {
      addFact(dl, "Operating point", "threshold " + pct(op.threshold) + (op.threshold_method ? " (" + op.threshold_method + ")" : ""));
    }
    if (typeof op.temperature === "number") addFact(dl, "Temperature", fmtNum(op.temperature, 3));
    const vm = m.val_metrics || {};
    const parts = [];
    if (typeof vm.roc_auc === "number") parts.push("AUC " + fmtNum(vm.roc_auc, 3));
    if (typeof vm.sensitivity === "number") parts.push("sensitivity " + fmtNum(vm.sensitivity, 3));
    if (typeof vm.specificity === "number") parts.push("specificity " + fmtNum(vm.specificity, 3));
    if (parts.length) addFact(dl, "Validation", parts.join(" · "));
    const caps = m.capabilities || {};
    addFact(dl, "Explanations", caps.heatmap ? "Grad-CAM" : "not available");
    if (m.limits && m.limits.max_upload_mb) {
      $("drop-hint").textContent = "JPEG, PNG or DICOM · up to " + m.limits.max_upload_mb + " MB";
    }
    if (m.shift && typeof m.shift.threshold === "number") {
      addFact(dl, "Shift check", "on · flags images unlike its validation images (score > " + fmtNum(m.shift.threshold, 1) + ")");
    }
    setupThresholds(m);
    if (m.model_card) {
      $("model-card-text").textContent = m.model_card;
      show($("model-card"), true);
    } else {
      show($("model-card"), false);
    }
  }

  // ------------------------------------------------------------------ threshold slider
  // The slider's positions are the thresholds of the model's operating curve (every 0.5 % and
  // the operating threshold itself); without a curve, the same grid without figures.
  function setupThresholds(m) {
    const op = (m.operating_point || {}).threshold;
    const curve = m.operating_curve;
    let t = curve && curve.thresholds ? curve.thresholds.slice() : [];
    if (!t.length) {
      for (let i = 0; i * CURVE_STEP <= 1 + 1e-9; i++) t.push(Math.round(i * CURVE_STEP * 1e6) / 1e6);
      if (typeof op === "number" && t.indexOf(op) < 0) t.push(op);
      t.sort(function (a, b) { return a - b; });
    }
    state.thresholds = t;
    $("threshold-slider").max = String(t.length - 1);
    setThreshold(typeof op === "number" ? op : 0.5);
  }

  function nearestIndex(value) {
    let best = 0;
    state.thresholds.forEach(function (t, i) {
      if (Math.abs(t - value) < Math.abs(state.thresholds[best] - value)) best = i;
    });
    return best;
  }

  function setThreshold(value) {
    $("threshold-slider").value = String(nearestIndex(value));
    relabel();
  }

  function currentThreshold() {
    const t = state.thresholds[Number($("threshold-slider").value)];
    return typeof t === "number" ? t : 0.5;
  }

  function operatingThreshold() {
    if (state.result && typeof state.result.threshold === "number") return state.result.threshold;
    const op = state.model && state.model.operating_point ? state.model.operating_point.threshold : null;
    return typeof op === "number" ? op : 0.5;
  }

  function thresholdMetrics(t) {
    const curve = state.model && state.model.operating_curve;
    if (!curve || !curve.thresholds) return "No validation figures are stored with this model.";
    const i = curve.thresholds.indexOf(t);
    if (i < 0) return "";
    const n = curve.n || {};
    return "On the model's " + curve.source + " (" + (n.PNEUMONIA || 0) + " pneumonia, " + (n.NORMAL || 0) +
      " normal) at this threshold: sensitivity " + pct(curve.sensitivity[i]) + ", specificity " + pct(curve.specificity[i]) + ".";
  }

  // Re-label the current answer at the slider's threshold (no request: the probability is known).
  function relabel() {
    const t = currentThreshold();
    const op = operatingThreshold();
    const atOp = Math.abs(t - op) < 1e-6;  // the curve's thresholds are rounded to 6 decimals
    $("threshold-value").textContent = pct(t);
    $("threshold-reset").disabled = atOp;
    $("threshold-metrics").textContent = thresholdMetrics(t) + (atOp ? "" : " The model's operating threshold is " + pct(op) + ".");
    const r = state.result;
    if (!r || r.refused || typeof r.probability !== "number") return;
    const positive = atOp ? r.label === "PNEUMONIA" : r.probability >= t;
    const cls = positive ? "pos" : "neg";
    const prob = $("probability");
    prob.classList.remove("pos", "neg");
    prob.classList.add(cls);
    const label = $("label");
    label.classList.remove("pos", "neg", "warn");
    label.textContent = positive ? "PNEUMONIA" : "NORMAL";
    label.classList.add(cls);
    $("gauge-fill").classList.toggle("pos", positive);
    $("gauge-mark").style.left = (100 * t).toFixed(2) + "%";
    $("threshold-text").textContent = (atOp ? "threshold " : "chosen threshold ") + pct(t);
    const which = atOp ? "the model's operating threshold" : "the chosen threshold";
    $("verdict").textContent = (positive
      ? "At or above " + which + ": findings consistent with pneumonia."
      : "Below " + which + ": no pneumonia detected by the model.") + " Model: " + r.model + ".";
  }

  function renderWarnings(list) {
    const ul = $("warnings-list");
    ul.replaceChildren();
    (list || []).forEach(function (w) {
      const li = document.createElement("li");
      li.textContent = w.charAt(0).toUpperCase() + w.slice(1);
      ul.appendChild(li);
    });
    show($("warnings"), !!(list && list.length));
  }

  // ------------------------------------------------------------------ result panel
  function hideError() { show($("error"), false); }

  function showError(text) {
    const e = $("error");
    e.textContent = text;
    show(e, true);
  }

  function resetResult() {
    state.result = null;
    renderWarnings([]);
    show($("result-empty"), true);
    show($("result-body"), false);
    show($("refused"), false);
    show($("timing"), false);
    show($("label"), false);
    hideError();
  }

  function renderTiming(t) {
    const dl = $("timing");
    dl.replaceChildren();
    const names = [["total", "total"], ["upload", "upload"], ["decode", "decode"], ["inference", "model"], ["render", "render"]];
    names.forEach(function (pair) {
      if (typeof t[pair[0]] !== "number") return;
      const wrap = document.createElement("div");
      const dt = document.createElement("dt");
      dt.textContent = pair[1];
      const dd = document.createElement("dd");
      dd.textContent = t[pair[0]].toFixed(0) + " ms";
      wrap.appendChild(dt);
      wrap.appendChild(dd);
      dl.appendChild(wrap);
    });
    show(dl, true);
  }

  function renderPrediction(r) {
    show($("result-empty"), false);
    state.result = r;
    renderWarnings(r.warnings);
    const label = $("label");
    label.classList.remove("pos", "neg", "warn");
    if (r.refused) {
      show($("result-body"), false);
      $("refused-reason").textContent = r.refused;
      show($("refused"), true);
      label.textContent = "REFUSED";
      label.classList.add("warn");
      show(label, true);
      renderTiming(r.timing_ms || {});
      return;
    }
    $("probability").textContent = pct(r.probability);
    show(label, true);
    $("gauge-fill").style.width = (100 * r.probability).toFixed(2) + "%";
    setThreshold(r.threshold);  // the answer as the model gives it; the slider then re-labels it
    show($("result-body"), true);
    renderTiming(r.timing_ms || {});
  }

  // ------------------------------------------------------------------ overlay
  function applyOpacity() {
    const v = Number($("opacity").value);
    $("overlay").style.opacity = String(v / 100);
    $("opacity-value").textContent = v + " %";
  }

  function setOverlay(heatmap) {
    const ov = $("overlay");
    const slider = $("opacity");
    if (heatmap && heatmap.png_base64) {
      ov.src = "data:image/png;base64," + heatmap.png_base64;
      show(ov, true);
      show($("heat-legend"), true);
      slider.disabled = false;
      $("overlay-note").textContent = "Grad-CAM" + (heatmap.layer ? " on layer " + heatmap.layer : "") +
        ": warm colours mark the regions that most supported the model's answer.";
      applyOpacity();
    } else {
      ov.removeAttribute("src");
      show(ov, false);
      show($("heat-legend"), false);
      slider.disabled = true;
      const caps = (state.model && state.model.capabilities) || {};
      $("overlay-note").textContent = caps.heatmap ? "" : "Grad-CAM is not available on this server.";
    }
  }

  // The image is shown as large as the viewer allows (small X-rays are scaled up) and keeps
  // its aspect ratio; the overlay covers exactly the same box.
  function fitFrame() {
    const xray = $("xray");
    const frame = $("frame");
    const w = xray.naturalWidth;
    const h = xray.naturalHeight;
    if (!w || !h) return;
    frame.style.aspectRatio = w + " / " + h;
    frame.style.width = "min(100%, calc(min(64vh, 620px) * " + (w / h).toFixed(5) + "))";
  }

  // ------------------------------------------------------------------ upload flow
  function isBrowserImage(file) {
    return BROWSER_IMAGE_TYPES.indexOf(file.type) >= 0;
  }

  function clearImage() {
    if (state.objectUrl) URL.revokeObjectURL(state.objectUrl);
    state.objectUrl = null;
    $("xray").removeAttribute("src");
    setOverlay(null);
    show($("stage"), false);
    show($("dropzone"), true);
    show($("clear-btn"), false);
    $("file-input").value = "";
    resetResult();
  }

  async function analyse(file) {
    if (!file || state.busy) return;
    resetResult();
    const limitMb = state.model && state.model.limits ? state.model.limits.max_upload_mb : null;
    if (limitMb && file.size > limitMb * 1e6) {
      show($("result-empty"), false);
      showError(file.name + " is " + fmtBytes(file.size) + "; the server accepts up to " + limitMb + " MB.");
      return;
    }
    if (state.objectUrl) URL.revokeObjectURL(state.objectUrl);
    state.objectUrl = null;
    const xray = $("xray");
    xray.removeAttribute("src");
    setOverlay(null);
    const browserImage = isBrowserImage(file);
    if (browserImage) {
      state.objectUrl = URL.createObjectURL(file);
      xray.src = state.objectUrl;
    }
    show($("dropzone"), false);
    show($("stage"), true);
    show($("clear-btn"), true);
    $("file-meta").textContent = file.name + " · " + fmtBytes(file.size);
    show($("busy"), true);
    state.busy = true;
    const form = new FormData();
    form.append("file", file, file.name);
    const query = "?heatmap=true" + (browserImage ? "" : "&preview=true");
    const r = await api("/v1/predict" + query, { method: "POST", body: form });
    state.busy = false;
    show($("busy"), false);
    if (r.status === 401) {
      await loadModel();
      return;
    }
    if (!r.ok || !r.body) {
      const detail = (r.body && r.body.detail) ? r.body.detail : "the server answered HTTP " + r.status;
      show($("result-empty"), false);
      showError("Could not analyse " + file.name + ": " + detail + ".");
      if (!browserImage) {
        show($("stage"), false);
        show($("dropzone"), true);
        show($("clear-btn"), false);
        $("file-input").value = "";
      }
      return;
    }
    const body = r.body;
    if (body.preview && body.preview.png_base64) {
      xray.src = "data:image/png;base64," + body.preview.png_base64;
    }
    if (body.image) {
      $("file-meta").textContent = file.name + " · " + body.image.format + " · " + body.image.width + "×" +
        body.image.height + " px · " + fmtBytes(body.image.bytes);
    }
    setOverlay(body.refused ? null : body.heatmap);
    renderPrediction(body);
  }

  // ------------------------------------------------------------------ wiring
  function init() {
    const dz = $("dropzone");
    const input = $("file-input");
    input.addEventListener("change", function () { if (input.files && input.files[0]) analyse(input.files[0]); });
    ["dragenter", "dragover"].forEach(function (ev) {
      dz.addEventListener(ev, function (e) { e.preventDefault(); dz.classList.add("drag"); });
    });
    ["dragleave", "dragend"].forEach(function (ev) {
      dz.addEventListener(ev, function () { dz.classList.remove("drag"); });
    });
    dz.addEventListener("drop", function (e) {
      e.preventDefault();
      dz.classList.remove("drag");
      const f = e.dataTransfer && e.dataTransfer.files && e.dataTransfer.files[0];
      if (f) analyse(f);
    });
    // dropping a file anywhere else must not navigate away from the page
    window.addEventListener("dragover", function (e) { e.preventDefault(); });
    window.addEventListener("drop", function (e) { e.preventDefault(); });
    $("clear-btn").addEventListener("click", clearImage);
    $("opacity").addEventListener("input", applyOpacity);
    $("threshold-slider").addEventListener("input", relabel);
    $("threshold-reset").addEventListener("click", function () { setThreshold(operatingThreshold()); });
    $("xray").addEventListener("load", fitFrame);
    $("key-form").addEventListener("submit", function (e) {
      e.preventDefault();
      state.key = $("api-key").value.trim();
      sessionStorage.setItem(KEY_STORE, state.key);
      loadModel();
    });
    applyOpacity();
    loadModel();
  }

  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", init);
  else init();
})();
