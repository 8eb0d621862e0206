// latentbank web UI: one page, hash routes, the public HTTP API only (Bearer key kept in
// sessionStorage). No build step: plain browser JavaScript and the vendored uPlot.
"use strict";

const KEY = "latentbank.key";
const state = { key: sessionStorage.getItem(KEY), scopes: [], timers: [], streams: [] };
// what the browser tests read: the playground's vector and answer, the scatter's points
const exposed = (window.latentbank = { playground: null, scatter: null, imageSearch: null,
                                       ready: false });

// -- helpers ------------------------------------------------------------------------------

function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else if (k === "text") el.textContent = v;
    else el.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children.flat(Infinity)) {
    if (c === null || c === undefined || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}

const can = (scope) => state.scopes.includes(scope);
const fmt = (v, d = 3) => (v === null || v === undefined ? "–" :
  typeof v === "number" && !Number.isInteger(v) ? v.toFixed(d) : String(v));

function toast(message, error = false) {
  const box = h("div", { class: error ? "error" : "" }, message);
  document.getElementById("toast").append(box);
  setTimeout(() => box.remove(), error ? 8000 : 3500);
}

class ApiError extends Error {}

async function api(path, { method = "GET", json, body, accept, headers = {} } = {}) {
  const init = { method, headers: { Authorization: `Bearer ${state.key}`, ...headers } };
  if (json !== undefined) {
    init.body = JSON.stringify(json);
    init.headers["Content-Type"] = "application/json";
  } else if (body !== undefined) init.body = body;
  if (accept) init.headers.Accept = accept;
  const res = await fetch(path, init);
  if (!res.ok) {
    let message = `${res.status} ${res.statusText}`;
    try { message = (await res.json()).error.message; } catch (_) { /* not JSON */ }
    if (res.status === 401) signOut();
    throw new ApiError(message);
  }
  if (accept && accept.startsWith("image/")) return URL.createObjectURL(await res.blob());
  return res.status === 204 ? null : res.json();
}

function every(ms, fn) {
  const id = setInterval(fn, ms);
  state.timers.push(id);
  return id;
}

function leaveView() {
  state.addModel = state.refreshJobs = null;
  state.timers.forEach(clearInterval);
  state.timers = [];
  state.streams.forEach((c) => c.abort());
  state.streams = [];
  exposed.playground = exposed.scatter = exposed.imageSearch = null;
  exposed.ready = false;
}

async function image(path, opts = {}) {
  const img = h("img", { class: "grid", alt: opts.alt || "" });
  try { img.src = await api(path, { accept: "image/png", ...opts }); }
  catch (e) { return h("p", { class: "muted" }, e.message); }
  return img;
}

function table(columns, rows, attrs = {}) {
  return h("table", attrs, h("thead", {}, h("tr", {}, columns.map((c) => h("th", {}, c)))),
    h("tbody", {}, rows));
}

// -- sign in ------------------------------------------------------------------------------

function signOut() {
  sessionStorage.removeItem(KEY);
  state.key = null;
  state.scopes = [];
  render();
}

function signInView(main) {
  const input = h("input", { id: "key", type: "password", placeholder: "lb_…",
                             autocomplete: "off", size: 40 });
  const form = h("form", { id: "signin", class: "card", onsubmit: async (ev) => {
    ev.preventDefault();
    state.key = input.value.trim();
    try {
      state.scopes = (await api("/v1/whoami")).scopes;
      sessionStorage.setItem(KEY, state.key);
      location.hash = "#/jobs";
      render();
    } catch (e) { toast(`sign-in failed: ${e.message}`, true); state.key = null; }
  } }, h("h1", {}, "Sign in"),
  h("p", { class: "muted" }, "An API key (`latentbank keys create`; `latentbank up` prints an ",
    "admin key). It stays in this tab's session storage and goes out only as the Bearer ",
    "header."), h("label", {}, "API key", input), h("p", {}, h("button", { id: "signin-go" },
    "Sign in")));
  main.append(form);
}

// -- datasets -----------------------------------------------------------------------------

async function datasetsView(main) {
  const list = await api("/v1/datasets");
  main.append(h("h1", {}, "Datasets"));
  if (can("write")) {
    main.append(uploadForm(), h("p", {}, h("button", { id: "add-digits", type: "button",
      class: "secondary", onclick: async () => {
        try {
          const d = await api("/v1/datasets", { method: "POST",
                                                json: { name: "digits", builtin: "digits" } });
          toast(`dataset ${d.id}: ${d.n_items} digits`);
          render();
        } catch (e) { toast(e.message, true); }
      } }, "Register scikit-learn's digits (built in)")));
  }
  const rows = await Promise.all(list.map(async (d) => h("tr", { "data-dataset-id": d.id },
    h("td", {}, d.id), h("td", {}, h("a", { href: `#/datasets/${d.id}` }, d.name)),
    h("td", { class: "num" }, d.n_items), h("td", {}, d.item_shape.join("×")),
    h("td", { class: "num" }, bytes(d.size_bytes)),
    h("td", {}, `[${fmt(d.min_value, 2)}, ${fmt(d.max_value, 2)}]`),
    h("td", {}, d.has_labels ? "yes" : "no"),
    h("td", {}, imageShape(d.item_shape) ? await image(
      `/v1/datasets/${d.id}/thumbnails.png?n=8&columns=8`, { alt: "first items" }) : ""),
    h("td", {}, new Date(d.created_at).toLocaleString()))));
  main.append(table(["id", "name", "items", "item shape", "size", "values", "labels",
                     "first items", "created"], rows, { id: "datasets-table" }));
}

function bytes(n) {
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return `${i ? n.toFixed(1) : n} ${units[i]}`;
}

function uploadForm() {
  const file = h("input", { id: "upload-file", type: "file",
    accept: ".npy,.npz,.parquet,.csv,.zip,.tar,.gz,.tgz" });
  const size = h("input", { id: "upload-image-size", placeholder: "images: e.g. 32 or 48x64" });
  const name = h("input", { id: "upload-name", placeholder: "name (default: the file's)" });
  const bar = h("progress", { id: "upload-progress", max: 1, value: 0, hidden: true });
  const form = h("form", { id: "upload", class: "card grid", onsubmit: (ev) => {
    ev.preventDefault();
    if (!file.files.length) return toast("choose a file first", true);
    const data = new FormData();
    data.append("file", file.files[0]);
    if (name.value) data.append("name", name.value);
    if (size.value) data.append("image_size", size.value);
    const xhr = new XMLHttpRequest(); // fetch cannot report upload progress
    xhr.open("POST", "/v1/datasets");
    xhr.setRequestHeader("Authorization", `Bearer ${state.key}`);
    bar.hidden = false;
    xhr.upload.onprogress = (e) => { if (e.lengthComputable) bar.value = e.loaded / e.total; };
    xhr.onload = () => {
      bar.hidden = true;
      let answer = {};
      try { answer = JSON.parse(xhr.responseText); } catch (_) { /* not JSON */ }
      if (xhr.status >= 400) return toast(answer.error ? answer.error.message : xhr.statusText, true);
      if (answer.mode === "job") { // archives and large files: an ingest job on the workers
        toast(`ingest job ${answer.job.id} queued`);
        bar.hidden = false;
        bar.value = 0;
        follow(answer.job.id, (job) => {
          bar.value = job.progress || 0;
          if (job.status === "succeeded") {
            bar.hidden = true;
            toast(`dataset ${job.dataset_id} registered: ${job.items_done} items`);
            render();
          } else if (["failed", "cancelled"].includes(job.status)) {
            bar.hidden = true;
            toast(`ingest job ${job.id} ${job.status}: ${job.error || ""}`, true);
          }
        });
        return;
      }
      toast(`dataset ${answer.id} registered: ${answer.n_items} items`);
      render();
    };
    xhr.onerror = () => { bar.hidden = true; toast("upload failed (network)", true); };
    xhr.send(data);
  } }, h("label", {}, "file (.npy, .npz, .parquet, .csv; images: .zip, .tar, .tar.gz)", file),
  h("label", {}, "name", name), h("label", {}, "image size", size),
  h("div", {}, h("button", { id: "upload-go" }, "Upload"), " ", bar));
  return form;
}

async function datasetView(main, id) {
  const d = await api(`/v1/datasets/${id}`);
  main.append(h("h1", {}, `Dataset ${d.id}: ${d.name}`), h("dl", { class: "summary card" },
    [["items", d.n_items], ["item shape", d.item_shape.join("×")],
     ["values", `[${fmt(d.min_value, 3)}, ${fmt(d.max_value, 3)}] (${d.dtype})`],
     ["labels", d.has_labels ? "yes" : "no"], ["source", d.source_uri || d.source_format],
     ["checksum", d.checksum.slice(0, 16) + "…"],
     ...(d.ingest && d.ingest.report ? [["read", `${d.ingest.report.read} items, ` +
       `${d.ingest.report.failed} unreadable, ${d.ingest.report.skipped || 0} skipped` +
       (d.ingest.image ? ` (${d.ingest.image.color}` +
         (d.ingest.image.size ? `, ${d.ingest.image.size.join("×")})` : ")") : "")]]
       : [])].map(([k, v]) => [h("dt", {}, k), h("dd", {}, v)])));
  const failures = (d.ingest && d.ingest.report && d.ingest.report.failures) || [];
  if (failures.length) {
    main.append(h("h2", {}, "Unreadable items"), table(["key", "reason"],
      failures.map((f) => h("tr", {}, h("td", {}, f.key), h("td", {}, f.reason))),
      { id: "ingest-failures" }));
  }
  if (imageShape(d.item_shape)) {
    main.append(h("h2", {}, "The first 32 items"),
      await image(`/v1/datasets/${id}/thumbnails.png?n=32&columns=16`, { alt: "items" }));
  }
}

// -- jobs ---------------------------------------------------------------------------------

async function jobsView(main) {
  main.append(h("h1", {}, "Jobs"));
  if (can("write")) main.append(await trainForm(), await embedForm());
  const body = h("tbody");
  main.append(h("h2", {}, "Recent jobs"),
    h("table", { id: "jobs-table" }, h("thead", {}, h("tr", {},
      ["id", "kind", "status", "progress", "ETA", "message", "result", ""].map(
        (c) => h("th", {}, c)))), body));
  const rows = new Map();
  const streamed = new Set();
  const paint = (j) => {
    let tr = rows.get(j.id);
    if (!tr) {
      tr = h("tr", { "data-job-id": j.id });
      rows.set(j.id, tr);
      body.prepend(tr);
    }
    const result = j.model_id && j.kind === "train" ? h("a", { href: `#/models/${j.model_id}` },
      `model ${j.model_id}`) : j.embedding_set_id ? h("a", {
      href: `#/embeddings/${j.embedding_set_id}` }, `set ${j.embedding_set_id}`) : "";
    const active = j.status === "queued" || j.status === "running";
    tr.replaceChildren(h("td", {}, j.id), h("td", {}, j.kind),
      h("td", { class: `status status-${j.status}` }, j.status),
      h("td", {}, h("progress", { max: 1, value: j.progress }), ` ${Math.round(100 * j.progress)}%`),
      h("td", { class: "eta" }, active && j.eta_seconds != null ? `${Math.round(j.eta_seconds)} s` : ""),
      h("td", { class: "message" }, j.error || j.progress_message || ""), h("td", {}, result),
      h("td", {}, can("write") && active && !j.cancel_requested ? h("button", {
        class: "danger cancel", type: "button", onclick: async () => {
          try { paint(await api(`/v1/jobs/${j.id}/cancel`, { method: "POST" })); }
          catch (e) { toast(e.message, true); }
        } }, "Cancel") : ""));
    if (j.kind === "train" && j.status === "succeeded" && state.addModel) state.addModel(j);
    if (active && !streamed.has(j.id)) {
      streamed.add(j.id);
      follow(j.id, paint);
    }
  };
  const refresh = async () => {
    try { (await api("/v1/jobs?limit=30")).reverse().forEach(paint); }
    catch (e) { toast(e.message, true); }
  };
  await refresh();
  every(3000, refresh);
  state.refreshJobs = refresh;
}

// Server-sent events with a Bearer header: EventSource cannot send one, so read the stream.
async function follow(jobId, onJob) {
  const ctl = new AbortController();
  state.streams.push(ctl);
  try {
    const res = await fetch(`/v1/jobs/${jobId}/events`, {
      headers: { Authorization: `Bearer ${state.key}` }, signal: ctl.signal });
    const reader = res.body.getReader();
    const decoder = new TextDecoder();
    let buffered = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffered += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buffered.indexOf("\n\n")) >= 0) {
        const block = buffered.slice(0, cut);
        buffered = buffered.slice(cut + 2);
        const data = block.split("\n").find((l) => l.startsWith("data: "));
        if (data) onJob(JSON.parse(data.slice(6)));
      }
    }
  } catch (e) { if (e.name !== "AbortError") console.warn("event stream", e); }
}

function field(label, input) { return h("label", {}, label, input); }

function options(items, value = (x) => x, text = (x) => x, selected) {
  return items.map((x) => h("option", { value: value(x), selected: value(x) === selected },
    text(x)));
}

async function trainForm() {
  const datasets = await api("/v1/datasets");
  const el = {
    dataset: h("select", { id: "tf-dataset" }, options(datasets, (d) => String(d.id),
      (d) => `${d.id}: ${d.name} (${d.n_items} × ${d.item_shape.join("×")})`)),
    family: h("select", { id: "tf-family" }, options(["mlp", "conv"])),
    latent: h("input", { id: "tf-latent", type: "number", min: 1, value: 8 }),
    hidden: h("input", { id: "tf-hidden", value: "128,64" }),
    likelihood: h("select", { id: "tf-likelihood" },
      options(["bernoulli", "continuous_bernoulli", "gaussian"])),
    binarize: h("select", { id: "tf-binarize" }, options(["dynamic", "static", "none"])),
    beta: h("input", { id: "tf-beta", type: "number", step: "any", value: 1 }),
    epochs: h("input", { id: "tf-epochs", type: "number", min: 1, value: 30 }),
    batch: h("input", { id: "tf-batch", type: "number", min: 1, value: 64 }),
    lr: h("input", { id: "tf-lr", type: "number", step: "any", value: 0.002 }),
    warmup: h("input", { id: "tf-warmup", type: "number", min: 0, value: 5 }),
    k: h("input", { id: "tf-k", type: "number", min: 0, value: 100 }),
  };
  return h("form", { id: "train-form", class: "card grid", onsubmit: async (ev) => {
    ev.preventDefault();
    const likelihood = el.likelihood.value;
    const model = { family: el.family.value, latent_dim: +el.latent.value,
      hidden: el.hidden.value.split(",").filter(Boolean).map(Number), likelihood,
      beta: +el.beta.value };
    if (likelihood === "bernoulli") model.binarize = el.binarize.value;
    try {
      const job = await api("/v1/training-jobs", { method: "POST", json: {
        dataset_id: +el.dataset.value, model, training: { epochs: +el.epochs.value,
          batch_size: +el.batch.value, lr: +el.lr.value, kl_warmup_epochs: +el.warmup.value,
          importance_samples: +el.k.value } } });
      toast(`training job ${job.id} queued (model ${job.model_id})`);
      if (state.refreshJobs) state.refreshJobs();
    } catch (e) { toast(e.message, true); }
  } }, h("h2", { style: "grid-column: 1 / -1; margin: 0" }, "Train a VAE"),
  field("dataset", el.dataset), field("family", el.family), field("latent size", el.latent),
  field("hidden layers", el.hidden), field("likelihood", el.likelihood),
  field("binarize (bernoulli)", el.binarize), field("β (KL weight)", el.beta),
  field("epochs", el.epochs), field("batch size", el.batch), field("learning rate", el.lr),
  field("KL warm-up epochs", el.warmup), field("held-out K (log p(x))", el.k),
  h("div", {}, h("button", { id: "tf-submit" }, "Queue training")));
}

async function embedForm() {
  const [models, datasets] = await Promise.all([api("/v1/models?status=ready"),
    api("/v1/datasets")]);
  const el = {
    model: h("select", { id: "ef-model" }, options(models, (m) => String(m.id),
      (m) => `model ${m.id} (dataset ${m.dataset_id})`)),
    dataset: h("select", { id: "ef-dataset" }, options(datasets, (d) => String(d.id),
      (d) => `${d.id}: ${d.name}`)),
    k: h("input", { id: "ef-k", type: "number", min: 0, value: 10 }),
  };
  const submit = h("button", { id: "ef-submit", disabled: !models.length }, "Queue embedding");
  state.addModel = (job) => { // a model that became ready while the page is open
    if ([...el.model.options].some((o) => o.value === String(job.model_id))) return;
    el.model.prepend(h("option", { value: String(job.model_id) },
      `model ${job.model_id} (dataset ${job.params.dataset_id})`));
    el.model.value = String(job.model_id);
    submit.disabled = false;
  };
  return h("form", { id: "embed-form", class: "card grid", onsubmit: async (ev) => {
    ev.preventDefault();
    try {
      const job = await api("/v1/embedding-jobs", { method: "POST", json: {
        model_id: +el.model.value, dataset_id: +el.dataset.value,
        importance_samples: +el.k.value } });
      toast(`embedding job ${job.id} queued (set ${job.embedding_set_id})`);
      if (state.refreshJobs) state.refreshJobs();
    } catch (e) { toast(e.message, true); }
  } }, h("h2", { style: "grid-column: 1 / -1; margin: 0" }, "Embed a dataset"),
  field("model", el.model), field("dataset", el.dataset),
  field("importance samples K (0: ELBO only)", el.k),
  h("div", {}, submit));
}

// -- models -------------------------------------------------------------------------------

async function modelsView(main) {
  const list = await api("/v1/models?limit=100");
  main.append(h("h1", {}, "Models"), table(
    ["id", "dataset", "status", "family", "latent", "likelihood", "held-out ELBO",
     "log p(x)", "bits/dim"], list.map((m) => {
      const c = m.config.model, s = m.summary || {};
      return h("tr", { "data-model-id": m.id },
        h("td", {}, h("a", { href: `#/models/${m.id}` }, m.id)), h("td", {}, m.dataset_id),
        h("td", { class: `status-${m.status}` }, m.status), h("td", {}, c.family),
        h("td", {}, c.latent_dim), h("td", {}, c.likelihood),
        h("td", { class: "num" }, fmt(s.heldout_elbo)), h("td", { class: "num" }, fmt(s.heldout_log_px)),
        h("td", { class: "num" }, s.likelihood_kind === "discrete" ? fmt(s.heldout_bits_per_dim, 4) : "–"));
    })));
}

const imageShape = (shape) => shape.length === 2 || (shape.length === 3 && [1, 3].includes(shape[0]));

function byKl(summary, dim) {
  const kl = (summary && summary.kl_per_dim) || Array(dim).fill(0);
  return [...kl.keys()].sort((a, b) => kl[b] - kl[a]).map((d) => ({ dim: d, kl: kl[d] }));
}

async function modelView(main, id) {
  const m = await api(`/v1/models/${id}`);
  const c = m.config.model, s = m.summary || {};
  main.append(h("h1", {}, `Model ${m.id}`));
  const collapse = s.collapse || {};
  const rows = [
    ["status", m.status], ["dataset", h("a", { href: `#/datasets/${m.dataset_id}` }, m.dataset_id)],
    ["architecture", `${c.family} ${c.hidden.join("-")}, latent ${c.latent_dim}, ${c.likelihood}` +
      (c.binarize && c.binarize !== "none" ? `, ${c.binarize} binarisation` : "") +
      (c.dequantize && c.dequantize !== "none" ? `, dequantised (${c.levels} levels)` : "")],
    ["held-out ELBO", fmt(s.heldout_elbo)],
    ["  reconstruction / KL", `${fmt(s.heldout_reconstruction)} / ${fmt(s.heldout_kl)}`],
    [`held-out log p(x) (K = ${s.heldout_importance_samples ?? "–"})`,
      `${fmt(s.heldout_log_px)} ± ${fmt(s.heldout_log_px_se)} (Monte-Carlo)`],
    ["bits per dimension", s.likelihood_kind === "discrete" ? fmt(s.heldout_bits_per_dim, 4) : "–"],
    ["figure", `${s.likelihood_kind || "–"}: ${s.likelihood_note || ""}`],
    ["active units", `${fmt(s.heldout_active_units)} of ${c.latent_dim}`],
    ["collapsed dimensions", collapse.collapsed_dims ? (collapse.collapsed_dims.join(", ") || "none") : "–"],
    ["epochs run (best)", `${fmt(s.epochs_run)} (${fmt(s.best_epoch)})`],
  ];
  main.append(h("dl", { class: "summary card", id: "model-summary" }, rows.map(([k, v]) =>
    [h("dt", {}, k), h("dd", {}, v)])));
  if (collapse.warning) main.append(h("p", { class: "warn" }, `warning: ${collapse.warning}`));
  if (m.status !== "ready") return;
  const metrics = await api(`/v1/models/${id}/metrics`);
  main.append(h("h2", {}, "Training curves"), curves(metrics));
  main.append(h("h2", {}, "Decoder playground"), await playground(m));
  if (imageShape(c.input_shape)) {
    main.append(h("h2", {}, "Prior samples (seed 0)"),
      await image(`/v1/models/${id}/sample`, { method: "POST", json: { n: 32, seed: 0 },
                                             alt: "prior samples" }));
    const items = await api(`/v1/datasets/${m.dataset_id}/items?limit=16`).catch(() => null);
    if (items) {
      main.append(h("h2", {}, "Reconstructions (top: items, bottom: decoded means)"),
        h("div", {}, await image(`/v1/datasets/${m.dataset_id}/thumbnails.png?n=16&columns=16`)),
        h("div", {}, await image(`/v1/models/${id}/reconstruct`, { method: "POST",
          json: { x: items.x } })));
    }
    main.append(h("h2", {}, "Traversals (rows: dimensions by held-out KL; columns: −3σ … +3σ)"),
      await image(`/v1/models/${id}/traverse`, { method: "POST",
        json: { top: Math.min(6, c.latent_dim), steps: 9 } }));
  }
}

function curves(metrics) {
  const box = h("div", { id: "curves", class: "card" });
  const epochs = [...new Set(metrics.map((r) => r.epoch))].sort((a, b) => a - b);
  const of = (split, name) => epochs.map((e) => {
    const r = metrics.find((x) => x.epoch === e && x.split === split);
    return r && r[name] !== null ? r[name] : null;
  });
  const data = [epochs, of("train", "elbo"), of("val", "elbo"), of("val", "log_px")];
  const opts = { width: 720, height: 260, scales: { x: { time: false } },
    series: [{ label: "epoch" }, { label: "train ELBO", stroke: "#98a2b3" },
      { label: "val ELBO", stroke: "#2458d6" }, { label: "val log p(x)", stroke: "#067647" }],
    axes: [{ label: "epoch" }, { label: "nats per item", size: 60 }] };
  requestAnimationFrame(() => new uPlot(opts, data, box));
  return box;
}

async function playground(m) {
  const c = m.config.model;
  const order = byKl(m.summary, c.latent_dim);
  const z = Array(c.latent_dim).fill(0);
  const shape = c.input_shape;
  const [hgt, wid, channels] = shape.length === 3 ? [shape[1], shape[2], shape[0]] :
    shape.length === 2 ? [shape[0], shape[1], 1] : squareOf(shape[0]);
  const scale = Math.max(1, Math.floor(192 / Math.max(hgt, wid)));
  const canvas = h("canvas", { id: "playground-canvas", class: "decoded",
                               width: wid * scale, height: hgt * scale });
  const sliders = h("div", { class: "sliders", id: "playground-sliders" });
  exposed.playground = { z: z.slice(), x: null, scale, decodes: 0 };
  let timer = null, pending = 0;
  const draw = async () => {
    const mine = ++pending;
    const answer = await api(`/v1/models/${m.id}/decode`, { method: "POST", json: { z: [z] } });
    if (mine !== pending) return; // a newer request is on its way
    const x = answer.x[0].flat(Infinity);
    paintImage(canvas, x, wid, hgt, channels, scale);
    exposed.playground = { z: z.slice(), x, scale, decodes: exposed.playground.decodes + 1 };
  };
  const schedule = () => { clearTimeout(timer); timer = setTimeout(() => draw().catch(
    (e) => toast(e.message, true)), 60); }; // debounced: one request per pause
  for (const { dim, kl } of order) {
    const out = h("span", { class: "muted" }, "0.00");
    const input = h("input", { type: "range", min: -3, max: 3, step: 0.05, value: 0,
      "data-dim": dim, oninput: () => {
        z[dim] = +input.value;
        out.textContent = z[dim].toFixed(2);
        schedule();
      } });
    sliders.append(h("span", {}, `z${dim} `, h("span", { class: "muted" }, `KL ${kl.toFixed(2)}`)),
      input, out);
  }
  await draw();
  return h("div", { class: "row card", id: "playground" }, h("div", {}, canvas),
    h("div", {}, h("p", { class: "muted" }, "one slider per latent dimension, most held-out KL ",
      "first; the image is the decoder's mean, fetched from /decode as you move them"),
    sliders, h("p", {}, h("button", { type: "button", class: "secondary", onclick: () => {
      z.fill(0);
      sliders.querySelectorAll("input").forEach((i) => { i.value = 0; i.dispatchEvent(new Event("input")); });
    } }, "Back to the prior mean"))));
}

function squareOf(n) {
  const side = Math.round(Math.sqrt(n));
  return side * side === n ? [side, side, 1] : [1, n, 1];
}

function paintImage(canvas, x, w, hgt, channels, scale) {
  const ctx = canvas.getContext("2d");
  const img = ctx.createImageData(w * scale, hgt * scale);
  for (let r = 0; r < hgt * scale; r++) {
    for (let col = 0; col < w * scale; col++) {
      const i = Math.floor(r / scale) * w + Math.floor(col / scale);
      const px = (r * w * scale + col) * 4;
      for (let ch = 0; ch < 3; ch++) {
        const v = x[(channels === 3 ? ch * w * hgt : 0) + i];
        img.data[px + ch] = Math.round(255 * Math.min(1, Math.max(0, v)));
      }
      img.data[px + 3] = 255;
    }
  }
  ctx.putImageData(img, 0, 0);
}

// -- embedding sets -----------------------------------------------------------------------

async function setsView(main) {
  const list = await api("/v1/embeddings?limit=100");
  main.append(h("h1", {}, "Embedding sets"), table(
    ["id", "model", "dataset", "status", "items", "dim", "K", "index", "mean log p(x)"],
    list.map((e) => h("tr", { "data-set-id": e.id },
      h("td", {}, h("a", { href: `#/embeddings/${e.id}` }, e.id)),
      h("td", {}, h("a", { href: `#/models/${e.model_id}` }, e.model_id)), h("td", {}, e.dataset_id),
      h("td", { class: `status-${e.status}` }, e.status), h("td", { class: "num" }, e.n_items),
      h("td", { class: "dim" }, e.vector_type === "halfvec" ? `${e.dim} (halfvec)` : e.dim),
      h("td", {}, e.importance_samples),
      h("td", { class: "index-status" }, indexText(e)),
      h("td", { class: "num" }, fmt((e.stats || {}).mean_log_px))))));
}

// The index's state with its build's progress (pg_stat_progress_create_index) while it
// runs, and a warning when the graph outgrew its memory (built partly on disk).
function indexText(es) {
  const b = es.index_build || {};
  if (es.index_status === "building" && b.fraction !== undefined) {
    return `building ${Math.round(100 * b.fraction)} % (${b.phase})`;
  }
  return b.fits === false ? `${es.index_status} (graph did not fit in memory)` : es.index_status;
}

function buildText(b) {
  if (!b || b.workers === undefined) return "–";
  const fit = b.fits ? "fitted" : `did not fit: spilled to disk after ${b.spilled_after ?? "?"} tuples`;
  const disk = b.index_mb !== undefined ? `, ${b.index_mb} MiB on disk` : "";
  const processes = (b.workers_launched ?? b.workers) + 1; // the leader and the workers started
  return `${processes} process(es), ${b.memory_mb} MiB given, ${b.needed_mb} MiB needed ` +
    `(${fit}), ${Number(b.seconds).toFixed(1)} s${disk}`;
}

const PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2",
                 "#7f7f7f", "#bcbd22", "#17becf"];

function ramp(t) { // low log p(x) dark red, high pale yellow
  const a = [[127, 0, 0], [215, 48, 31], [252, 141, 89], [254, 224, 139]];
  const s = Math.min(0.999, Math.max(0, t)) * (a.length - 1), i = Math.floor(s), f = s - i;
  return `rgb(${a[i].map((v, k) => Math.round(v + f * (a[i + 1][k] - v))).join(",")})`;
}

async function setView(main, id) {
  const es = await api(`/v1/embeddings/${id}`);
  const st = es.stats || {};
  main.append(h("h1", {}, `Embedding set ${es.id}`), h("dl", { class: "summary card" },
    [["model", h("a", { href: `#/models/${es.model_id}` }, es.model_id)],
     ["dataset", h("a", { href: `#/datasets/${es.dataset_id}` }, es.dataset_id)],
     ["status / index", `${es.status} / ${indexText(es)}`], ["index build", buildText(es.index_build)],
     ["items", es.n_items],
     ["vectors", `${es.dim}-d ${es.vector_type === "halfvec" ? "halfvec (float16)" : "vector (float32)"}`],
     ["mean ELBO", fmt(st.mean_elbo)],
     ["mean log p(x)", `${fmt(st.mean_log_px)} ± ${fmt(st.mean_log_px_se)} (K = ${es.importance_samples})`],
     ["figure", st.likelihood_kind || "–"],
     ["kNN label accuracy", fmt(st.knn_label_accuracy)]].map(([k, v]) => [h("dt", {}, k),
       h("dd", {}, v)])));
  if (es.status !== "ready") return;
  const p = await api(`/v1/embeddings/${id}/projection?n=2000`);
  const model = await api(`/v1/models/${es.model_id}`);
  const colourBy = h("select", { id: "colour-by" }, options(["label", "log p(x)"]));
  const canvas = h("canvas", { id: "scatter", width: 560, height: 560 });
  const tooltip = h("div", { id: "tooltip" });
  const neighbours = h("div", { id: "neighbours" });
  const keyInput = h("input", { id: "search-key", placeholder: "an item's key" });
  main.append(h("h2", {}, `Latent space: PCA of μ (${p.keys.length} of ${p.n_items} items; `,
    `axes explain ${(100 * p.explained_variance[0]).toFixed(0)} % and `,
    `${(100 * p.explained_variance[1]).toFixed(0)} %)`),
  h("div", { class: "row" }, h("div", {}, h("label", {}, "colour by", colourBy), canvas, tooltip),
    h("div", { style: "flex: 1; min-width: 320px" },
      h("form", { class: "row", onsubmit: (ev) => { ev.preventDefault();
        showNeighbours(es, model, keyInput.value.trim(), neighbours); } },
      keyInput, h("button", { id: "search-go" }, "Nearest neighbours")), neighbours,
      imageShape(model.config.model.input_shape) ? imageQuery(es, model) : "")));
  const xs = p.points.map((q) => q[0]), ys = p.points.map((q) => q[1]);
  const [x0, x1, y0, y1] = [Math.min(...xs), Math.max(...xs), Math.min(...ys), Math.max(...ys)];
  const pad = 16, W = canvas.width - 2 * pad, H = canvas.height - 2 * pad;
  const pts = p.points.map(([x, y], i) => ({ key: p.keys[i], label: p.labels[i],
    log_px: p.log_px[i], elbo: p.elbo[i],
    sx: pad + (x1 > x0 ? (x - x0) / (x1 - x0) : 0.5) * W,
    sy: pad + (y1 > y0 ? 1 - (y - y0) / (y1 - y0) : 0.5) * H }));
  const labels = [...new Set(p.labels.map(String))].sort();
  const figure = (q) => (q.log_px !== null ? q.log_px : q.elbo);
  const lo = Math.min(...pts.map(figure)), hi = Math.max(...pts.map(figure));
  let selected = null;
  const paint = () => {
    const ctx = canvas.getContext("2d");
    ctx.clearRect(0, 0, canvas.width, canvas.height);
    for (const q of pts) {
      ctx.fillStyle = colourBy.value === "label" ? PALETTE[labels.indexOf(String(q.label)) % 10]
        : ramp((figure(q) - lo) / (hi - lo || 1));
      ctx.beginPath(); ctx.arc(q.sx, q.sy, 2.5, 0, 2 * Math.PI); ctx.fill();
    }
    if (selected) {
      ctx.strokeStyle = "#000"; ctx.lineWidth = 2;
      ctx.beginPath(); ctx.arc(selected.sx, selected.sy, 6, 0, 2 * Math.PI); ctx.stroke();
    }
  };
  const nearest = (ev) => {
    const r = canvas.getBoundingClientRect();
    const mx = ev.clientX - r.left, my = ev.clientY - r.top;
    let best = null, bestD = 64; // within 8 px
    for (const q of pts) {
      const d = (q.sx - mx) ** 2 + (q.sy - my) ** 2;
      if (d < bestD) { best = q; bestD = d; }
    }
    return best;
  };
  canvas.addEventListener("mousemove", (ev) => {
    const q = nearest(ev);
    tooltip.style.display = q ? "block" : "none";
    if (q) {
      tooltip.style.left = `${ev.clientX + 12}px`;
      tooltip.style.top = `${ev.clientY + 12}px`;
      tooltip.textContent = `key ${q.key} · label ${q.label ?? "–"} · log p(x) ${fmt(q.log_px, 2)}`;
    }
  });
  canvas.addEventListener("mouseleave", () => { tooltip.style.display = "none"; });
  canvas.addEventListener("click", (ev) => {
    const q = nearest(ev);
    if (!q) return;
    selected = q;
    paint();
    keyInput.value = q.key;
    showNeighbours(es, model, q.key, neighbours);
  });
  colourBy.addEventListener("change", paint);
  paint();
  exposed.scatter = { points: pts.map(({ key, sx, sy }) => ({ key, sx, sy })), neighbours: null };
  const out = await api(`/v1/embeddings/${id}/outliers?k=10`);
  main.append(h("h2", {}, `Outliers: the 10 lowest ${out.ranked_by === "log_px" ? "log p(x)" : "ELBO"}`),
    table(["key", "label", "ELBO", "log p(x)"], out.results.map((r) => h("tr", {},
      h("td", {}, h("a", { href: "#", onclick: (ev) => { ev.preventDefault();
        showNeighbours(es, model, r.key, neighbours); } }, r.key)), h("td", {}, r.label ?? "–"),
      h("td", { class: "num" }, fmt(r.elbo)), h("td", { class: "num" }, fmt(r.log_px))))));
}

async function showNeighbours(es, model, key, box) {
  if (!key) return;
  box.replaceChildren(h("p", { class: "muted" }, `searching the neighbours of ${key}…`));
  try {
    const [item, found] = await Promise.all([
      api(`/v1/embeddings/${es.id}/items/${encodeURIComponent(key)}`),
      api(`/v1/embeddings/${es.id}/search`, { method: "POST", json: { key, k: 8 } })]);
    const keys = found.results.map((r) => r.key);
    const mus = await Promise.all(keys.map((k) =>
      api(`/v1/embeddings/${es.id}/items/${encodeURIComponent(k)}`).then((it) => it.mu)));
    const image = imageShape(model.config.model.input_shape);
    const grid = image ? await api(`/v1/models/${model.id}/decode`, { method: "POST",
      json: { z: [item.mu, ...mus] }, accept: "image/png" }) : null;
    box.replaceChildren(h("p", {}, `item ${key} (label ${item.label ?? "–"}, log p(x) `,
      `${fmt(item.log_px, 2)}) and its ${keys.length} nearest neighbours by L2 distance of μ `,
      h("span", { class: "muted" }, `(plan: ${found.plan})`)),
    grid ? h("img", { class: "grid", src: grid, alt: "decoded neighbours" }) : "",
    h("table", { class: "neighbours", id: "neighbour-table" }, h("thead", {}, h("tr", {},
      ["key", "label", "distance", "log p(x)"].map((c) => h("th", {}, c)))),
    h("tbody", {}, found.results.map((r) => h("tr", { "data-key": r.key }, h("td", {}, r.key),
      h("td", {}, r.label ?? "–"), h("td", { class: "num" }, fmt(r.distance, 4)),
      h("td", { class: "num" }, fmt(r.log_px, 2)))))));
    if (exposed.scatter) {
      exposed.scatter.neighbours = { key, results: found.results.map((r) => ({ key: r.key,
        distance: r.distance })) };
    }
  } catch (e) { box.replaceChildren(h("p", { class: "warn" }, e.message)); }
}

// -- search by image ----------------------------------------------------------------------

const IMAGE_TYPES = "image/png,image/jpeg,image/webp,image/bmp,image/gif";

function imageQuery(es, model) {
  const box = h("div", { id: "image-results" });
  const file = h("input", { type: "file", id: "image-file", accept: IMAGE_TYPES,
    onchange: () => { if (file.files[0]) searchByImage(es, model, file.files[0], box); } });
  const zone = h("div", { id: "image-drop", class: "drop" },
    h("p", {}, "Drop an image here, or ", h("label", { class: "file" }, "choose a file", file)),
    h("p", { class: "muted" }, "it is decoded and resized as the set's dataset was, encoded ",
      "by the model, and searched like an item of the set"));
  zone.addEventListener("dragover", (ev) => { ev.preventDefault(); zone.classList.add("over"); });
  zone.addEventListener("dragleave", () => zone.classList.remove("over"));
  zone.addEventListener("drop", (ev) => {
    ev.preventDefault();
    zone.classList.remove("over");
    const dropped = ev.dataTransfer.files[0];
    if (dropped) searchByImage(es, model, dropped, box);
  });
  return h("div", { class: "card", id: "image-query" }, h("h2", {}, "Search by image"), zone, box);
}

function imageForm(file, fields) {
  const form = new FormData();
  form.append("image", file, file.name || "query");
  for (const [k, v] of Object.entries(fields)) form.append(k, String(v));
  return form;
}

// The query's score: against the held-out threshold at fpr 1 % when the model has one
// (a 409 says it has none: scored without it).
async function scoreImage(model, file) {
  const path = `/v1/models/${model.id}/score`;
  try {
    return await api(path, { method: "POST", body: imageForm(file, { fpr: 0.01 }) });
  } catch (e) {
    if (!/held-out thresholds|fpr/.test(e.message)) throw e;
    return api(path, { method: "POST", body: imageForm(file, {}) });
  }
}

function thumbnail(es, index) {
  const img = h("img", { class: "thumb", alt: `item ${index}` });
  api(`/v1/datasets/${es.dataset_id}/thumbnails.png?offset=${index}&n=1&columns=1`,
    { accept: "image/png" }).then((url) => { img.src = url; }).catch(() => img.remove());
  return img;
}

function scoreLine(score) {
  const figure = score.log_px ? "log p(x)" : "ELBO";
  const value = (score.log_px || score.elbo)[0];
  if (!score.threshold) return h("p", { id: "image-score" }, `${figure} ${fmt(value, 2)} `,
    h("span", { class: "muted" }, "(the model has no held-out threshold)"));
  const t = score.threshold, outlier = score.is_outlier[0];
  return h("p", { id: "image-score" }, `${figure} ${fmt(value, 2)} against the held-out `,
    `threshold ${fmt(t.value, 2)} (${100 * t.fpr} % of ${t.split} items lie below it): `,
    h("strong", { class: outlier ? "warn" : "ok" }, outlier ? "an outlier" : "typical"));
}

async function searchByImage(es, model, file, box) {
  box.replaceChildren(h("p", { class: "muted" }, `searching the neighbours of ${file.name}…`));
  try {
    const [found, score] = await Promise.all([
      api(`/v1/embeddings/${es.id}/search`, { method: "POST",
        body: imageForm(file, { k: 8 }) }),
      scoreImage(model, file)]);
    box.replaceChildren(h("div", { class: "row" },
      h("img", { class: "thumb query", src: URL.createObjectURL(file), alt: file.name }),
      h("div", {}, h("p", {}, `${file.name}: its ${found.results.length} nearest neighbours `,
        h("span", { class: "muted" }, `(plan: ${found.plan})`)), scoreLine(score))),
    h("table", { class: "neighbours", id: "image-neighbours" }, h("thead", {}, h("tr", {},
      ["item", "key", "label", "distance", "log p(x)"].map((c) => h("th", {}, c)))),
    h("tbody", {}, found.results.map((r) => h("tr", { "data-key": r.key },
      h("td", {}, thumbnail(es, r.index)), h("td", {}, r.key), h("td", {}, r.label ?? "–"),
      h("td", { class: "num" }, fmt(r.distance, 4)), h("td", { class: "num" }, fmt(r.log_px, 2)))))));
    exposed.imageSearch = { name: file.name, score,
      results: found.results.map((r) => ({ key: r.key, distance: r.distance })) };
  } catch (e) {
    box.replaceChildren(h("p", { class: "warn", id: "image-error" }, e.message));
    exposed.imageSearch = { name: file.name, error: e.message };
  }
}

// -- the router ---------------------------------------------------------------------------

const ROUTES = [
  [/^#\/datasets\/(\d+)$/, datasetView], [/^#\/datasets$/, datasetsView],
  [/^#\/jobs$/, jobsView], [/^#\/models\/(\d+)$/, modelView], [/^#\/models$/, modelsView],
  [/^#\/embeddings\/(\d+)$/, setView], [/^#\/embeddings$/, setsView],
];

async function render() {
  leaveView();
  // each view draws into its own node: a slow answer of a view left behind lands in a
  // detached node, never in the next view
  const main = h("div");
  document.getElementById("main").replaceChildren(main);
  const signedIn = Boolean(state.key);
  document.getElementById("nav").hidden = !signedIn;
  document.getElementById("signout").hidden = !signedIn;
  if (!signedIn) {
    document.getElementById("who").textContent = "";
    return signInView(main);
  }
  if (!state.scopes.length) {
    try { state.scopes = (await api("/v1/whoami")).scopes; } catch (e) { return; }
  }
  document.getElementById("who").textContent = `key scopes: ${state.scopes.join(", ")}` +
    (can("write") ? "" : " (read only)");
  const hash = location.hash || "#/jobs";
  document.querySelectorAll("nav a").forEach((a) =>
    a.classList.toggle("active", hash.startsWith(a.getAttribute("href"))));
  for (const [pattern, view] of ROUTES) {
    const match = hash.match(pattern);
    if (match) {
      try { await view(main, ...match.slice(1)); }
      catch (e) { main.append(h("p", { class: "warn" }, e.message)); }
      exposed.ready = true; // every request of the view has answered
      return;
    }
  }
  location.hash = "#/jobs";
}

window.addEventListener("hashchange", render);
document.getElementById("signout").addEventListener("click", signOut);
render();
