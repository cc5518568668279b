// VESSA review page: plain JavaScript, no build step, talks only to this service's API.
// Views by URL hash: #/ (jobs), #/jobs/ID (cases, least trusted first), #/jobs/ID/cases/CASE (viewer).
"use strict";

const API = new URL("../", location.href); // the page lives at <service>/ui/
const TOKEN_KEY = "vessa-token";
const $ = (id) => document.getElementById(id);
const state = { jobId: null, cases: [], caseId: null, detail: null, z: 0, t: 0, hidden: new Set(), timer: null, imgUrl: null, drawSeq: 0 };

// ------------------------------------------------------------------------------------------- API
class AuthError extends Error {}

async function api(path, options = {}) {
  const headers = new Headers(options.headers || {});
  const token = sessionStorage.getItem(TOKEN_KEY);
  if (token) headers.set("Authorization", "Bearer " + token);
  const res = await fetch(new URL(path, API), { ...options, headers });
  if (res.status === 401) throw new AuthError("missing or invalid token");
  if (!res.ok) {
    let detail = res.statusText;
    try { detail = (await res.json()).detail || detail; } catch (_) { /* not JSON */ }
    throw new Error(typeof detail === "string" ? detail : JSON.stringify(detail));
  }
  return res;
}
const getJSON = async (path) => (await api(path)).json();
async function blobUrl(path) {
  return URL.createObjectURL(await (await api(path)).blob()); // <img> cannot send the token itself
}

function showError(err) {
  if (err instanceof AuthError) return showLogin(sessionStorage.getItem(TOKEN_KEY) ? "The token was refused." : "");
  $("error").textContent = String(err.message || err);
}

// ------------------------------------------------------------------------------------------- login
function showLogin(message) {
  $("app").hidden = true;
  $("login").hidden = false;
  $("login-error").textContent = message || "";
  $("token").focus();
}

$("login-form").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  sessionStorage.setItem(TOKEN_KEY, $("token").value);
  try {
    await getJSON("v1/jobs?limit=1");
    $("login").hidden = true;
    route();
  } catch (err) {
    sessionStorage.removeItem(TOKEN_KEY);
    showLogin(err instanceof AuthError ? "The token was refused." : String(err.message));
  }
});

// ------------------------------------------------------------------------------------------- views
function show(view) {
  for (const v of ["jobs-view", "cases-view", "viewer-view"]) $(v).hidden = v !== view;
  $("app").hidden = false;
  $("error").textContent = "";
}

function crumbs() {
  const parts = ['<a href="#/">jobs</a>'];
  if (state.jobId) parts.push(`<a href="#/jobs/${state.jobId}">${state.jobId}</a>`);
  if (state.caseId && location.hash.includes("/cases/")) parts.push(escapeHtml(state.caseId));
  $("crumbs").innerHTML = parts.join(" › ");
}

function escapeHtml(s) {
  return String(s).replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" })[c]);
}
// Colours through the CSSOM: the page's CSP forbids inline style attributes.
function colour(root) {
  for (const el of root.querySelectorAll("[data-colour]")) {
    const c = `rgb(${el.dataset.colour})`;
    if (el.classList.contains("swatch")) el.style.background = c; else el.style.borderLeftColor = c;
  }
}
const fmt = (v, d = 3) => (v === null || v === undefined ? "–" : Number(v).toFixed(d));
// A 4D cine case (its record has `frames`): slices are per frame, slice_confidence is frame-major.
const isCine = (d) => Array.isArray(d.record.frames) && d.record.frames.length > 0;
const depthOf = (d) => (isCine(d) ? d.record.shape[1] : d.record.slices);
const framesOf = (d) => (isCine(d) ? d.record.frames.length : 1);
const when = (t) => (t ? new Date(t * 1000).toLocaleString() : "–");

async function renderJobs() {
  show("jobs-view");
  state.jobId = state.caseId = null;
  crumbs();
  const { jobs } = await getJSON("v1/jobs?limit=100");
  const body = $("jobs").querySelector("tbody");
  body.innerHTML = "";
  $("jobs-empty").hidden = jobs.length > 0;
  for (const j of jobs) {
    const c = j.counts;
    const pct = j.slices_total ? Math.round((100 * j.slices_done) / j.slices_total) : (j.state === "done" ? 100 : 0);
    const tr = document.createElement("tr");
    tr.dataset.job = j.job_id;
    tr.innerHTML = `<td><a href="#/jobs/${j.job_id}">${j.job_id}</a></td><td class="state-${j.state}">${j.state}</td>
      <td><progress max="100" value="${pct}"></progress> ${pct}%</td>
      <td>${c.labeled + c.skipped}/${c.cases}</td><td>${c.failed}</td><td>${fmt(j.slices_per_s, 2)}</td>
      <td>${escapeHtml(j.spec.data.split("/").slice(-2).join("/"))}</td><td>${when(j.started)}</td>`;
    body.appendChild(tr);
  }
  // live while any job runs
  if (jobs.some((j) => j.state === "queued" || j.state === "running")) schedule(renderJobs, 2000);
}

function schedule(fn, ms) {
  clearTimeout(state.timer);
  state.timer = setTimeout(() => { if (!document.hidden) fn().catch(showError); else schedule(fn, ms); }, ms);
}

async function renderCases(jobId) {
  show("cases-view");
  state.jobId = jobId;
  state.caseId = null;
  crumbs();
  $("cases-job").textContent = jobId;
  const data = await getJSON(`v1/jobs/${jobId}/cases`);
  state.cases = data.cases;
  const body = $("cases").querySelector("tbody");
  body.innerHTML = "";
  for (const c of data.cases) {
    const tr = document.createElement("tr");
    tr.dataset.case = c.case_id;
    const classes = Object.entries(c.classes).map(([name, s]) =>
      `<span class="chip" data-colour="${s.colour.join(",")}">${escapeHtml(name)} ${fmt(s.confidence_mean, 2)} · ${s.volume_ml === null ? s.voxels + " vox" : fmt(s.volume_ml, 1) + " mL"}</span>`).join(" ");
    let frames = "", slices = String(c.slices);
    if (c.frames && c.frames.length) { // a cine: its frames' confidence, the least trusted first named
      const worst = c.frames.find((f) => f.frame === c.worst_frame);
      frames = `<small class="frames" data-worst-frame="${c.worst_frame}">${c.frames.length} frames · worst t=${c.worst_frame}: ${fmt(worst && worst.confidence, 2)}</small>`;
      slices = `${c.frames.length} × ${c.slices / c.frames.length}`;
    }
    tr.innerHTML = `<td>${c.rank}</td><td><img class="thumb" alt=""></td>
      <td><a href="#/jobs/${jobId}/cases/${encodeURIComponent(c.case_id)}">${escapeHtml(c.case_id)}</a></td>
      <td>${fmt(c.confidence)}${frames}</td><td>${classes}</td><td>${slices}</td>
      <td class="review review-${c.review}">${c.review}${c.versions ? " v" + c.versions : ""}${c.in_bank !== null ? " · bank v" + c.in_bank : ""}</td>`;
    body.appendChild(tr);
    colour(tr);
    blobUrl(`v1/jobs/${jobId}/cases/${encodeURIComponent(c.case_id)}/thumbnail.png`)
      .then((u) => { tr.querySelector("img.thumb").src = u; })
      .catch(() => {});
  }
  if (data.state === "queued" || data.state === "running") schedule(() => renderCases(jobId), 3000);
}

async function renderViewer(jobId, caseId) {
  show("viewer-view");
  clearTimeout(state.timer);
  if (state.jobId !== jobId || !state.cases.length) {
    state.jobId = jobId;
    state.cases = (await getJSON(`v1/jobs/${jobId}/cases`)).cases;
  }
  const fresh = state.caseId !== caseId;
  if (fresh) state.hidden = new Set();
  state.caseId = caseId;
  crumbs();
  $("viewer-case").textContent = caseId;
  const d = await getJSON(`v1/jobs/${jobId}/cases/${encodeURIComponent(caseId)}`);
  state.detail = d;
  const depth = depthOf(d);
  if (fresh) [state.t, state.z] = worstPlace(d);
  $("slice").max = String(depth - 1);
  $("frame-nav").hidden = !isCine(d);
  $("frame-keys").hidden = !isCine(d);
  $("frame").max = String(framesOf(d) - 1);
  // class toggles
  const toggles = $("class-toggles");
  toggles.innerHTML = "";
  for (const [name, s] of Object.entries(d.record.classes).sort((a, b) => a[1].index - b[1].index)) {
    const label = document.createElement("label");
    label.className = "toggle";
    label.innerHTML = `<input type="checkbox" data-class="${s.index}" ${state.hidden.has(s.index) ? "" : "checked"}>
      <span class="swatch" data-colour="${(d.class_colours[s.index] || [200, 200, 200]).join(",")}"></span>${escapeHtml(name)}`;
    label.querySelector("input").addEventListener("change", (ev) => {
      if (ev.target.checked) state.hidden.delete(s.index); else state.hidden.add(s.index);
      drawSlice();
    });
    toggles.appendChild(label);
  }
  colour(toggles);
  renderConfidence(d);
  renderReview(d.review);
  await drawSlice();
}

function worstPlace(d) {
  // open the case where the assistant is least sure of itself: [frame, slice]
  let t = 0, classes = d.record.classes;
  if (isCine(d)) { // the least trusted frame, then its least trusted slice
    let low = Infinity;
    for (const f of d.record.frames) {
      const c = f.confidence === null ? -1 : f.confidence;
      if (c < low) { low = c; t = f.frame; }
    }
    classes = d.record.frames.find((f) => f.frame === t).classes;
  }
  let z = Math.floor(depthOf(d) / 2), worst = Infinity;
  for (const s of Object.values(classes)) {
    if (s.worst_slice !== null && s.confidence_worst !== null && s.confidence_worst < worst) { worst = s.confidence_worst; z = s.worst_slice; }
  }
  return [t, z];
}

function renderConfidence(d) {
  const classes = Object.entries(d.record.classes).sort((a, b) => a[1].index - b[1].index);
  $("slice-conf").querySelector("thead").innerHTML = `<tr><th>slice</th>${classes.map(([n]) => `<th>${escapeHtml(n)}</th>`).join("")}</tr>`;
  const body = $("slice-conf").querySelector("tbody");
  body.innerHTML = "";
  const depth = depthOf(d), t = isCine(d) ? state.t : 0; // a cine: the rows of the frame shown
  (d.record.slice_confidence || []).slice(t * depth, (t + 1) * depth).forEach((row, z) => {
    const tr = document.createElement("tr");
    tr.dataset.z = String(z);
    tr.innerHTML = `<td>${z}</td>${classes.map(([, s]) => `<td>${fmt(row[s.index], 2)}</td>`).join("")}`;
    tr.addEventListener("click", () => setSlice(z));
    body.appendChild(tr);
  });
}

function renderReview(rev) {
  $("review-state").textContent = rev.state + (rev.versions.length ? ` (v${rev.versions.length})` : "") + (rev.bank_version !== null ? ` · bank v${rev.bank_version}` : "");
  $("review-state").className = "badge review-" + rev.state;
  $("comment").value = rev.comment || "";
}

async function drawSlice() {
  const d = state.detail;
  if (!d) return;
  const depth = depthOf(d);
  const z = Math.max(0, Math.min(state.z, depth - 1));
  const t = Math.max(0, Math.min(state.t, framesOf(d) - 1));
  state.z = z;
  state.t = t;
  $("slice").value = String(z);
  $("slice-label").textContent = `slice ${z + 1} / ${depth}`;
  if (isCine(d)) {
    const f = d.record.frames[t];
    $("frame").value = String(t);
    $("frame-label").textContent = `frame ${t + 1} / ${framesOf(d)} · confidence ${fmt(f && f.confidence, 3)}`;
  }
  for (const tr of $("slice-conf").querySelectorAll("tbody tr")) tr.classList.toggle("current", tr.dataset.z === String(z));
  const shown = Object.values(d.record.classes).map((s) => s.index).filter((k) => !state.hidden.has(k));
  const q = new URLSearchParams({
    label: $("label-kind").value,
    opacity: String($("opacity").value / 100),
    centre: String($("wc").value / 100),
    width: String($("ww").value / 100),
    classes: shown.join(","),
    t: String(t),
  });
  const seq = ++state.drawSeq;
  const url = await blobUrl(`v1/jobs/${state.jobId}/cases/${encodeURIComponent(state.caseId)}/slices/${z}.png?${q}`);
  if (seq !== state.drawSeq) { URL.revokeObjectURL(url); return; } // a later draw was asked for meanwhile
  if (state.imgUrl) URL.revokeObjectURL(state.imgUrl);
  state.imgUrl = url;
  const img = $("slice-img");
  img.dataset.z = String(z);
  img.dataset.t = String(t);
  img.src = url;
}

function setSlice(z) {
  state.z = z;
  drawSlice().catch(showError);
}

function setFrame(t) {
  const d = state.detail;
  if (!d || !isCine(d)) return;
  const next = Math.max(0, Math.min(t, framesOf(d) - 1));
  if (next === state.t && $("slice-img").dataset.t === String(next)) return;
  state.t = next;
  renderConfidence(d); // the confidence rows are the frame's
  drawSlice().catch(showError);
}

function stepCase(delta) {
  const i = state.cases.findIndex((c) => c.case_id === state.caseId);
  const next = state.cases[i + delta];
  if (next) location.hash = `#/jobs/${state.jobId}/cases/${encodeURIComponent(next.case_id)}`;
}

// ------------------------------------------------------------------------------------------- actions
async function review(stateName) {
  const rev = await (await api(`v1/jobs/${state.jobId}/cases/${encodeURIComponent(state.caseId)}/review`, {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify({ state: stateName, comment: $("comment").value }),
  })).json();
  renderReview(rev);
  $("review-msg").textContent = `${state.caseId}: ${rev.state}`;
  remember(rev);
}

function remember(rev) { // keep the case list (n/p order) and its review column in step
  const row = state.cases.find((c) => c.case_id === rev.case_id);
  if (row) { row.review = rev.state; row.versions = rev.versions.length; }
}
$("approve").addEventListener("click", () => review("approved").catch(showError));
$("reject").addEventListener("click", () => review("rejected").catch(showError));
$("flag").addEventListener("click", () => review("flagged").catch(showError));

$("upload-form").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  const file = $("label-file").files[0];
  if (!file) { $("review-msg").textContent = "choose a NIfTI label file first"; return; }
  const form = new FormData();
  form.append("file", file, file.name);
  form.append("comment", $("comment").value);
  try {
    const rev = await (await api(`v1/jobs/${state.jobId}/cases/${encodeURIComponent(state.caseId)}/label`, { method: "POST", body: form })).json();
    renderReview(rev);
    $("review-msg").textContent = `${state.caseId}: corrected label v${rev.versions.length} stored`;
    $("label-kind").value = "current";
    remember(rev);
    await drawSlice();
  } catch (err) {
    showError(err);
    $("review-msg").textContent = String(err.message || err);
  }
});

$("add-to-bank").addEventListener("click", async () => {
  try {
    const res = await (await api(`v1/jobs/${state.jobId}/bank`, { method: "POST", headers: { "Content-Type": "application/json" }, body: "{}" })).json();
    const n = Object.keys(res.added).length;
    $("bank-result").textContent = `bank version ${res.bank_version}: ${n} case${n === 1 ? "" : "s"} added` + (n ? ` (${Object.keys(res.added).join(", ")})` : "");
    await renderCases(state.jobId);
  } catch (err) {
    showError(err);
  }
});

for (const id of ["opacity", "wc", "ww", "label-kind"]) $(id).addEventListener("change", () => drawSlice().catch(showError));
$("slice").addEventListener("input", () => setSlice(Number($("slice").value)));
$("prev-slice").addEventListener("click", () => setSlice(state.z - 1));
$("next-slice").addEventListener("click", () => setSlice(state.z + 1));
$("frame").addEventListener("input", () => setFrame(Number($("frame").value)));
$("prev-frame").addEventListener("click", () => setFrame(state.t - 1));
$("next-frame").addEventListener("click", () => setFrame(state.t + 1));

document.addEventListener("keydown", (ev) => {
  if ($("viewer-view").hidden || ev.target.matches("input[type=text], input[type=password], textarea")) return;
  const cine = state.detail && isCine(state.detail); // a cine: ←/→ step through time, ↑/↓ through slices
  if (cine && (ev.key === "ArrowRight" || ev.key === "]")) { setFrame(state.t + 1); ev.preventDefault(); }
  else if (cine && (ev.key === "ArrowLeft" || ev.key === "[")) { setFrame(state.t - 1); ev.preventDefault(); }
  else if (ev.key === "ArrowUp" || ev.key === "ArrowRight" || ev.key === "k") { setSlice(state.z + 1); ev.preventDefault(); }
  else if (ev.key === "ArrowDown" || ev.key === "ArrowLeft" || ev.key === "j") { setSlice(state.z - 1); ev.preventDefault(); }
  else if (ev.key === "n") stepCase(1);
  else if (ev.key === "p") stepCase(-1);
});

// ------------------------------------------------------------------------------------------- routing
async function route() {
  const m = location.hash.match(/^#\/jobs\/([0-9a-f]{12})(?:\/cases\/(.+))?$/);
  try {
    if (m && m[2]) await renderViewer(m[1], decodeURIComponent(m[2]));
    else if (m) await renderCases(m[1]);
    else await renderJobs();
    const info = await getJSON("v1/info").catch(() => null);
    if (info) $("service").textContent = `${info.model} · bank v${info.bank_version} (${info.bank_size} templates)`;
  } catch (err) {
    showError(err);
  }
}
window.addEventListener("hashchange", route);
route();
