// Cohortflow web page: plain JavaScript on the gateway's JSON API (/api), no build step.
// Views: "#/" (cohorts, new cohort) and "#/cohorts/<id>" (stages, jobs with live progress, series,
// export files). All text goes through textContent, never innerHTML, so nothing from the API runs.
"use strict";

const POLL_MS = 2000;
const STAGE_LABELS = {
  anonymization: "Anonymization",
  extraction: "Extraction",
  sorting: "Sorting",
  export: "BIDS export",
};
const TERMINAL = new Set(["completed", "failed", "cancelled"]);

let pollTimer = null;
let currentCohortId = null;
let shownExportJob = null;

// --- API access -----------------------------------------------------------------------------

function token() {
  return sessionStorage.getItem("cohortflow-token") || "";
}

class ApiError extends Error {
  constructor(status, detail) {
    super(typeof detail === "string" ? detail : JSON.stringify(detail, null, 1));
    this.status = status;
  }
}

async function api(method, path, body) {
  const headers = { Accept: "application/json" };
  if (token()) headers.Authorization = `Bearer ${token()}`;
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const response = await fetch(path, {
    method,
    headers,
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  if (response.status === 401) {
    showTokenForm();
    throw new ApiError(401, "an API token is needed");
  }
  if (response.status === 204) return null;
  const data = await response.json().catch(() => ({ detail: response.statusText }));
  if (!response.ok) throw new ApiError(response.status, describe(data.detail));
  return data;
}

function describe(detail) {
  // FastAPI-style lists of {loc, msg} become one readable line each
  if (Array.isArray(detail)) {
    return detail.map((e) => `${(e.loc || []).join(".")}: ${e.msg}`).join("\n");
  }
  return detail;
}

// --- small DOM helpers -------------------------------------------------------------------------

const $ = (selector) => document.querySelector(selector);

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (key === "class") node.className = value;
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else node.setAttribute(key, value);
  }
  for (const child of children) {
    if (child === null || child === undefined) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

function badge(state) {
  return el("span", { class: `badge ${state}` }, String(state).replace("_", " "));
}

function bar(percent) {
  const inner = el("div");
  inner.style.width = `${Math.max(0, Math.min(100, percent || 0))}%`;
  const outer = el("div", { class: "progress", title: `${(percent || 0).toFixed(1)} %` }, inner);
  return outer;
}

function when(iso) {
  return iso ? new Date(iso).toLocaleString() : "";
}

function size(bytes) {
  if (bytes === null || bytes === undefined) return "";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let value = bytes;
  let unit = 0;
  while (value >= 1024 && unit < units.length - 1) {
    value /= 1024;
    unit += 1;
  }
  return `${value.toFixed(unit ? 1 : 0)} ${units[unit]}`;
}

function notify(message, kind = "error") {
  const box = $("#notice");
  box.textContent = message;
  box.className = kind === "info" ? "info" : "";
  box.hidden = !message;
}

function fail(error) {
  if (error instanceof ApiError && error.status === 401) return;
  notify(error.message || String(error));
}

function replaceRows(tbody, rows) {
  tbody.replaceChildren(...rows);
}

// --- views ----------------------------------------------------------------------------------------

function showOnly(id) {
  for (const view of ["token-view", "list-view", "cohort-view"]) {
    document.getElementById(view).hidden = view !== id;
  }
  $("#forget-token").hidden = !token();
}

function showTokenForm() {
  stopPolling();
  showOnly("token-view");
  $("#token-input").focus();
}

function route() {
  stopPolling();
  notify("");
  const match = location.hash.match(/^#\/cohorts\/([0-9a-f-]{36})$/);
  if (match) openCohort(match[1]);
  else openList();
}

function stopPolling() {
  if (pollTimer) clearTimeout(pollTimer);
  pollTimer = null;
}

function poll(refresh) {
  stopPolling();
  const tick = async () => {
    try {
      await refresh();
      $("#poll-state").textContent = `updated ${new Date().toLocaleTimeString()}`;
    } catch (error) {
      fail(error);
    }
    pollTimer = setTimeout(tick, POLL_MS);
  };
  pollTimer = setTimeout(tick, POLL_MS);
}

// cohorts list

async function openList() {
  currentCohortId = null;
  showOnly("list-view");
  try {
    await renderCohorts();
    poll(renderCohorts);
  } catch (error) {
    fail(error);
  }
}

async function renderCohorts() {
  const cohorts = await api("GET", "/api/cohorts");
  $("#no-cohorts").hidden = cohorts.length > 0;
  replaceRows(
    $("#cohort-table tbody"),
    cohorts.map((c) =>
      el(
        "tr",
        { class: "clickable", onclick: () => (location.hash = `#/cohorts/${c.id}`) },
        el("td", {}, el("a", { href: `#/cohorts/${c.id}` }, c.name)),
        el("td", {}, badge(c.status)),
        el("td", {}, bar(c.completion_percentage)),
        el("td", { class: "num" }, c.total_subjects),
        el("td", { class: "num" }, c.total_sessions),
        el("td", { class: "num" }, c.total_series),
        el("td", {}, c.owner),
        el("td", {}, when(c.created_at)),
      ),
    ),
  );
}

async function createCohort(event) {
  event.preventDefault();
  const form = event.target;
  const data = new FormData(form);
  const body = {
    name: data.get("name").trim(),
    source_path: data.get("source_path").trim(),
    description: data.get("description").trim(),
    owner: data.get("owner").trim(),
    tags: data
      .get("tags")
      .split(",")
      .map((t) => t.trim())
      .filter(Boolean),
    anonymization_enabled: data.get("anonymization_enabled") === "on",
  };
  try {
    const cohort = await api("POST", "/api/cohorts", body);
    form.reset();
    location.hash = `#/cohorts/${cohort.id}`;
  } catch (error) {
    fail(error);
  }
}

// one cohort

async function openCohort(id) {
  currentCohortId = id;
  shownExportJob = null;
  showOnly("cohort-view");
  replaceRows($("#series-table tbody"), []);
  $("#no-series").hidden = true;
  $("#export-card").hidden = true;
  try {
    await renderCohort();
    poll(renderCohort);
  } catch (error) {
    fail(error);
  }
}

async function renderCohort() {
  const id = currentCohortId;
  const [cohort, jobs] = await Promise.all([
    api("GET", `/api/cohorts/${id}`),
    api("GET", `/api/jobs?cohort_id=${id}&limit=200`),
  ]);
  if (id !== currentCohortId) return;
  $("#cohort-name").textContent = cohort.name;
  $("#cohort-status").replaceWith(
    Object.assign(badge(cohort.status), { id: "cohort-status" }),
  );
  $("#cohort-description").textContent = cohort.description || "";
  const facts = [
    ["Source", cohort.source_path],
    ["Owner", cohort.owner || "—"],
    ["Tags", cohort.tags.join(", ") || "—"],
    ["Anonymization", cohort.anonymization_enabled ? "enabled" : "off"],
    ["Subjects", cohort.total_subjects],
    ["Sessions", cohort.total_sessions],
    ["Series", cohort.total_series],
    ["Complete", `${cohort.completion_percentage.toFixed(1)} %`],
  ];
  $("#cohort-facts").replaceChildren(
    ...facts.flatMap(([k, v]) => [el("dt", {}, k), el("dd", {}, v)]),
  );
  $("#cohort-progress").style.width = `${cohort.completion_percentage}%`;
  $("#delete-cohort").disabled = cohort.status === "in_progress";
  renderStages(cohort, jobs);
  renderJobs(jobs);
  const lastExport = jobs.find((j) => j.stage === "export" && j.status === "completed");
  if (lastExport && lastExport.id !== shownExportJob) {
    shownExportJob = lastExport.id;
    await renderExport(cohort.id, lastExport);
  }
}

function renderStages(cohort, jobs) {
  const busy = cohort.status === "in_progress";
  const incomplete = new Set(jobs.filter((j) => j.left_work_behind).map((j) => j.id));
  replaceRows(
    $("#stage-table tbody"),
    cohort.stages.map((s, index) => {
      const before = index === 0 ? null : cohort.stages[index - 1];
      const ready = !busy && (before === null || before.state === "completed");
      const run = el(
        "button",
        { class: "secondary", onclick: () => runStage(cohort.id, s.stage) },
        s.state === "completed" ? "Run again" : "Run",
      );
      run.disabled = !ready;
      run.title = ready ? "" : busy ? "a job is in progress" : `needs ${before.stage} completed`;
      return el(
        "tr",
        {},
        el("td", {}, STAGE_LABELS[s.stage] || s.stage),
        el("td", {}, badge(s.state === "completed" && incomplete.has(s.job_id) ? "incomplete" : s.state)),
        el("td", {}, bar(s.state === "completed" ? 100 : s.progress)),
        el("td", { class: "mono" }, s.job_id ? s.job_id.slice(0, 8) : ""),
        el("td", {}, run),
      );
    }),
  );
}

function renderJobs(jobs) {
  const rows = [];
  for (const j of jobs) {
    const cancel = TERMINAL.has(j.status)
      ? null
      : el("button", { class: "danger", onclick: () => cancelJob(j.id) }, "Cancel");
    // a completed job that left work behind is not a clean success: an amber badge and its reason
    const shown = j.left_work_behind ? "incomplete" : j.status;
    const status = el("td", {}, badge(shown), j.scoped ? el("span", { class: "muted" }, " study") : null);
    const stalled = (j.status_reason || "").startsWith("stalled: ");
    if (j.status_reason && (stalled || j.left_work_behind || j.status === "failed" || j.status === "cancelled")) {
      status.append(el("div", { class: j.left_work_behind || stalled ? "left-behind" : "muted" }, j.status_reason));
    }
    rows.push(
      el(
        "tr",
        {},
        el("td", {}, STAGE_LABELS[j.stage] || j.stage),
        status,
        el("td", {}, bar(j.progress)),
        el("td", { class: "num" }, `${j.items_done} / ${j.items_total}`),
        el("td", { class: "num" }, j.items_failed),
        el("td", {}, when(j.started_at)),
        el("td", {}, when(j.finished_at)),
        el("td", {}, cancel),
      ),
    );
    if (j.errors.length) {
      const list = el("ul", { class: "errors" });
      for (const e of j.errors.slice(-10)) list.append(el("li", {}, `${e.item}: ${e.message}`));
      rows.push(el("tr", {}, el("td", {}), el("td", { colspan: "7" }, list)));
    }
  }
  replaceRows($("#job-table tbody"), rows);
}

async function runStage(cohortId, stage) {
  const text = prompt(
    `Configuration for ${STAGE_LABELS[stage]} (JSON object, {} for the defaults):`,
    "{}",
  );
  if (text === null) return;
  let config;
  try {
    config = JSON.parse(text || "{}");
  } catch (error) {
    notify(`not valid JSON: ${error.message}`);
    return;
  }
  try {
    await api("POST", `/api/cohorts/${cohortId}/stages/${stage}/run`, { config });
    notify(`${STAGE_LABELS[stage]} requested`, "info");
    await renderCohort();
  } catch (error) {
    fail(error);
  }
}

async function runPipeline(event) {
  event.preventDefault();
  let body;
  try {
    body = JSON.parse($("#pipeline-config").value || "{}");
  } catch (error) {
    notify(`not valid JSON: ${error.message}`);
    return;
  }
  try {
    const run = await api("POST", `/api/cohorts/${currentCohortId}/pipeline`, body);
    // the configuration may hold a password: do not leave it on the page
    $("#pipeline-config").value = "{}";
    $("#pipeline-box").open = false;
    notify(`pipeline started: ${run.jobs.map((j) => j.stage).join(" → ")}`, "info");
    await renderCohort();
  } catch (error) {
    fail(error);
  }
}

async function cancelJob(jobId) {
  if (!confirm("Cancel this job (and the later stages of its run)?")) return;
  try {
    await api("POST", `/api/jobs/${jobId}/cancel`);
    await renderCohort();
  } catch (error) {
    fail(error);
  }
}

async function deleteCohort() {
  if (!confirm("Delete this cohort from the gateway? Its jobs are deleted with it.")) return;
  try {
    await api("DELETE", `/api/cohorts/${currentCohortId}`);
    location.hash = "#/";
  } catch (error) {
    fail(error);
  }
}

async function loadSeries() {
  try {
    const series = await api("GET", `/api/cohorts/${currentCohortId}/series`);
    $("#no-series").hidden = series.length > 0;
    const rows = [];
    for (const s of series) {
      const stacks = s.stacks.length ? s.stacks : [{ stack_key: "", n_instances: s.n_instances }];
      stacks.forEach((st, index) => {
        const first = index === 0;
        const bids = st.bids_datatype ? `${st.bids_datatype}/${st.bids_suffix || "?"}` : "";
        const axes = [st.base, st.technique].filter(Boolean).join(" / ");
        const review = st.review_required
          ? el("span", { class: "badge failed", title: (st.review_reasons || []).join("; ") }, "review")
          : "";
        rows.push(
          el(
            "tr",
            {},
            el("td", { class: "mono" }, first ? s.subject_id : ""),
            el("td", { class: "num" }, first ? (s.series_number ?? "") : ""),
            el("td", {}, first ? s.description || "" : ""),
            el("td", {}, first ? s.modality || "" : ""),
            el("td", { class: "mono" }, st.stack_key),
            el("td", { class: "num" }, st.n_instances ?? ""),
            el("td", {}, axes || (st.base === null ? "not sorted" : "")),
            el("td", {}, st.intent || ""),
            el("td", { class: "mono" }, bids),
            el("td", { class: "num" }, st.confidence == null ? "" : st.confidence.toFixed(2)),
            el("td", {}, review),
          ),
        );
      });
    }
    replaceRows($("#series-table tbody"), rows);
  } catch (error) {
    fail(error);
  }
}

async function renderExport(cohortId, job) {
  const listing = await api("GET", `/api/cohorts/${cohortId}/exports/${job.id}`);
  $("#export-card").hidden = false;
  $("#export-caption").textContent =
    `${listing.files.length} files from export job ${job.id.slice(0, 8)}, finished ${when(job.finished_at)}`;
  replaceRows(
    $("#export-table tbody"),
    listing.files.map((f) =>
      el(
        "tr",
        {},
        el("td", {}, el("a", { href: f.download_url, onclick: (e) => download(e, f) }, f.path)),
        el("td", {}, f.kind || ""),
        el("td", { class: "num" }, size(f.size)),
        el("td", { class: "mono", title: f.sha256 || "" }, (f.sha256 || "").slice(0, 12)),
      ),
    ),
  );
}

async function download(event, file) {
  if (!token()) return; // a plain link works without a token
  event.preventDefault();
  try {
    const response = await fetch(file.download_url, {
      headers: { Authorization: `Bearer ${token()}` },
    });
    if (!response.ok) throw new ApiError(response.status, `download failed (${response.status})`);
    const url = URL.createObjectURL(await response.blob());
    const link = el("a", { href: url, download: file.path.split("/").pop() });
    document.body.append(link);
    link.click();
    link.remove();
    setTimeout(() => URL.revokeObjectURL(url), 10000);
  } catch (error) {
    fail(error);
  }
}

// --- wiring ---------------------------------------------------------------------------------------

document.addEventListener("DOMContentLoaded", () => {
  $("#token-form").addEventListener("submit", (event) => {
    event.preventDefault();
    sessionStorage.setItem("cohortflow-token", $("#token-input").value.trim());
    $("#token-input").value = "";
    route();
  });
  $("#forget-token").addEventListener("click", () => {
    sessionStorage.removeItem("cohortflow-token");
    showTokenForm();
  });
  $("#cohort-form").addEventListener("submit", createCohort);
  $("#refresh-cohorts").addEventListener("click", () => renderCohorts().catch(fail));
  $("#pipeline-form").addEventListener("submit", runPipeline);
  $("#delete-cohort").addEventListener("click", deleteCohort);
  $("#load-series").addEventListener("click", loadSeries);
  window.addEventListener("hashchange", route);
  route();
});
