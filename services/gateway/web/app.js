// Cohortflow web page: plain JavaScript on the gateway's public JSON API (/api), no build step.
// Routes: "#/" home, "#/new" new cohort, "#/cohorts/<id>" a cohort (stages, forms, results,
// review, browser), "#/jobs?cohort_id=&stage=&status=" the Jobs tab, "#/jobs/<id>" a job.
// All text goes through textContent, never innerHTML, so nothing from the API runs as markup.
"use strict";

const POLL_MS = 2000;
const STAGE_LABELS = {
  anonymization: "Anonymization",
  extraction: "Extraction",
  sorting: "Sorting",
  export: "BIDS export",
};
const TERMINAL = new Set(["completed", "failed", "cancelled"]);
const DATATYPES = ["anat", "dwi", "func", "fmap", "perf"];
const UUID = "[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}";
const FIELD_LABELS = {
  name: "Name",
  source_path: "Source path",
  description: "Description",
  owner: "Owner",
  tags: "Tags",
  anonymization_enabled: "Anonymization",
};

// every route change starts a new view generation: answers for an older view are dropped, so a
// slow reply can never draw cohort A's stages on cohort B's page (nor run anything on A)
let generation = 0;
let pollTimer = null;
let configSchema = null;
let current = { cohort: null, jobs: [], series: null, exportShown: null };

// --- API access -----------------------------------------------------------------------------

function token() {
  return sessionStorage.getItem("cohortflow-token") || "";
}

class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

async function api(method, path, body) {
  const headers = { Accept: "application/json" };
  const sent = token();
  if (sent) headers.Authorization = `Bearer ${sent}`;
  if (body !== undefined) headers["Content-Type"] = "application/json";
  let response;
  try {
    response = await fetch(path, {
      method,
      headers,
      body: body === undefined ? undefined : JSON.stringify(body),
    });
  } catch (error) {
    throw new ApiError(0, "the gateway does not answer (is the stack running?)");
  }
  if (response.status === 401) {
    // requests in flight together all come back 401: the first says why, the others keep it
    if (sent) {
      if (token() === sent) sessionStorage.removeItem("cohortflow-token");
      showTokenForm("That token was refused: check it and try again.");
    } else if ($("#token-view").hidden) {
      showTokenForm("");
    }
    throw new ApiError(401, "an API token is needed");
  }
  if (response.status === 204) return null;
  const data = await response.json().catch(() => ({ detail: response.statusText }));
  if (!response.ok) throw new ApiError(response.status, describe(data.detail, response.status));
  return data;
}

// --- readable messages --------------------------------------------------------------------------

function fieldName(loc) {
  const parts = (loc || []).filter((p) => p !== "body" && p !== "query" && p !== "path");
  const named = parts.filter((p) => typeof p === "string");
  const last = named[named.length - 1];
  if (parts.length === 1 && FIELD_LABELS[last]) return FIELD_LABELS[last];
  return named.join(" › ").replaceAll("_", " ") || "the request";
}

function plainMessage(issue) {
  const ctx = issue.ctx || {};
  const type = issue.type || "";
  const msg = String(issue.msg || "");
  // the number from the context, else from pydantic's sentence ("at least 8 items")
  const limit = (key) => ctx[key] ?? (msg.match(/(\d+)/) || [])[1] ?? "?";
  // a secret is text, even where pydantic counts "items" (SecretStr)
  const path = (issue.loc || []).join(".");
  const text = type.startsWith("string") || /password|secret|token/i.test(path);
  if (type === "string_pattern_mismatch") return "contains characters that are not allowed";
  if (type === "string_too_short" || (type === "too_short" && text)) {
    const n = limit("min_length");
    return String(n) === "1" ? "is required" : `needs at least ${n} characters`;
  }
  if (type === "string_too_long" || (type === "too_long" && text)) {
    return `may have at most ${limit("max_length")} characters`;
  }
  if (type === "too_short") return `needs at least ${limit("min_length")} entries`;
  if (type === "too_long") return `may have at most ${limit("max_length")} entries`;
  if (type === "missing") return "is required";
  if (type === "extra_forbidden") return "is not a setting of this stage";
  if (type === "literal_error" || type === "enum") return `must be one of ${ctx.expected || "the listed values"}`;
  if (type.startsWith("greater_than")) return `must be at least ${ctx.ge ?? ctx.gt}`;
  if (type.startsWith("less_than")) return `must be at most ${ctx.le ?? ctx.lt}`;
  if (type === "int_parsing" || type === "int_type") return "must be a whole number";
  if (type === "bool_parsing" || type === "bool_type") return "must be yes or no";
  if (type === "uuid_parsing") return "is not a valid id";
  return String(issue.msg || "is not acceptable").replace(/^Value error, /, "");
}

function describe(detail, status) {
  // lists of {loc, msg, type} (FastAPI and the stage configs) become one sentence each
  if (Array.isArray(detail)) {
    return detail.map((e) => `${fieldName(e.loc)} ${plainMessage(e)}`).join("\n");
  }
  if (typeof detail === "string") return detail;
  return `the gateway answered ${status}`;
}

// --- small DOM helpers -------------------------------------------------------------------------

const $ = (selector) => document.querySelector(selector);

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (value === undefined || value === null || value === false) continue;
    if (key === "class") node.className = value;
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else node.setAttribute(key, value === true ? "" : value);
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined || child === false) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

function badge(state, text) {
  return el("span", { class: `badge ${state}` }, text || String(state).replace("_", " "));
}

function bar(percent, state) {
  const inner = el("div");
  inner.style.width = `${Math.max(0, Math.min(100, percent || 0))}%`;
  return el(
    "div",
    { class: `progress ${state || ""}`, title: `${(percent || 0).toFixed(1)} %` },
    inner,
  );
}

function percent(value) {
  return `${(value || 0).toFixed(0)} %`;
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

function wrap(table) {
  return el("div", { class: "table-wrap" }, table);
}

function table(headings, rows) {
  return wrap(
    el(
      "table",
      {},
      el("thead", {}, el("tr", {}, headings.map((h) => el("th", {}, h)))),
      el("tbody", {}, rows),
    ),
  );
}

function facts(pairs) {
  return pairs
    .filter(([, v]) => v !== undefined && v !== null && v !== "")
    .map(([k, v]) => el("div", { class: "fact" }, el("dt", {}, k), el("dd", {}, v)));
}

// --- notices: fixed to the viewport, so they are seen wherever the page is scrolled -------------

function notify(message, kind = "error") {
  if (!message) return;
  const box = el(
    "div",
    { class: `notice ${kind}`, role: kind === "error" ? "alert" : "status" },
    el("span", { class: "notice-text" }, message),
    el("button", { class: "link close", type: "button", "aria-label": "close" }, "×"),
  );
  box.querySelector("button").addEventListener("click", () => box.remove());
  $("#notices").append(box);
  // information goes by itself; an error stays until closed or the view changes
  if (kind !== "error") setTimeout(() => box.remove(), 6000);
  // a success supersedes the errors before it
  if (kind !== "error") for (const old of $("#notices").querySelectorAll(".notice.error")) old.remove();
}

function clearNotices() {
  $("#notices").replaceChildren();
}

function fail(error, where) {
  if (error instanceof ApiError && error.status === 401) return;
  const message = error.message || String(error);
  if (where) {
    where.textContent = message;
    where.hidden = false;
    where.scrollIntoView({ block: "nearest" });
  }
  notify(message);
}

// --- views ----------------------------------------------------------------------------------------

const VIEWS = ["home-view", "new-view", "missing-view", "cohort-view", "jobs-view", "job-view"];

function showView(id) {
  $("#token-view").hidden = true;
  $("#app").hidden = false;
  for (const view of VIEWS) document.getElementById(view).hidden = view !== id;
  $("#forget-token").hidden = !token();
  $("#tab-jobs").classList.toggle("active", id === "jobs-view" || id === "job-view");
  $("#tab-cohorts").classList.toggle("active", !(id === "jobs-view" || id === "job-view"));
}

function showTokenForm(problem) {
  generation += 1;
  stopPolling();
  $("#app").hidden = true;
  $("#forget-token").hidden = true;
  $("#token-view").hidden = false;
  $("#token-problem").textContent = problem || "";
  $("#token-problem").hidden = !problem;
  $("#token-input").focus();
}

function stopPolling() {
  if (pollTimer) clearTimeout(pollTimer);
  pollTimer = null;
}

// refresh now and every POLL_MS while the view is the same; `refresh` returns false to stop
function poll(refresh, gen, stateId) {
  stopPolling();
  const tick = async () => {
    if (gen !== generation) return;
    let again = true;
    try {
      again = (await refresh(gen)) !== false;
      if (stateId && gen === generation) {
        $(stateId).textContent = `updated ${new Date().toLocaleTimeString()}`;
      }
    } catch (error) {
      if (gen === generation) fail(error);
    }
    if (again && gen === generation) pollTimer = setTimeout(tick, POLL_MS);
  };
  return tick();
}

function route() {
  generation += 1;
  const gen = generation;
  stopPolling();
  clearNotices();
  current = { cohort: null, jobs: [], series: null, exportShown: null };
  const hash = location.hash || "#/";
  const cohort = hash.match(new RegExp(`^#/cohorts/(${UUID})$`));
  const job = hash.match(new RegExp(`^#/jobs/(${UUID})$`));
  renderSidebar(gen).catch((error) => fail(error));
  if (cohort) return openCohort(cohort[1], gen);
  if (job) return openJob(job[1], gen);
  if (hash.startsWith("#/jobs")) return openJobs(gen);
  if (hash === "#/new") return openNew();
  if (hash === "#/" || hash === "#") return showView("home-view");
  return showMissing(`There is no page at ${hash}.`);
}

function showMissing(text) {
  stopPolling();
  current.cohort = null;
  $("#missing-text").textContent = text;
  showView("missing-view");
}

// --- sidebar ------------------------------------------------------------------------------------

// what a cohort's last run came to: the latest stage that ran decides (failed and cancelled
// are shown as such, not as "idle")
function lastResult(cohort) {
  const ran = cohort.stages.filter((s) => s.state !== "not_started");
  if (cohort.status === "in_progress") {
    const running = ran.find((s) => s.state === "running" || s.state === "pending");
    return { state: "in_progress", text: running ? `${STAGE_LABELS[running.stage]} running` : "in progress" };
  }
  const bad = ran.find((s) => s.state === "failed" || s.state === "cancelled");
  if (bad) return { state: bad.state, text: `${STAGE_LABELS[bad.stage]} ${bad.state}` };
  if (!ran.length) return { state: "idle", text: "nothing run yet" };
  const last = ran[ran.length - 1];
  return { state: cohort.status, text: `${STAGE_LABELS[last.stage]} ${last.state}` };
}

async function renderSidebar(gen) {
  const [cohorts, studies] = await Promise.all([
    api("GET", "/api/cohorts"),
    api("GET", "/api/studies?limit=200").catch(() => []),
  ]);
  if (gen !== undefined && gen !== generation) return cohorts;
  const received = {};
  for (const s of studies) {
    if (s.cohort_id && !s.refused_reason && s.outcome !== "retracted") received[s.cohort_id] = (received[s.cohort_id] || 0) + 1;
  }
  const open = current.cohort ? current.cohort.id : null;
  $("#no-cohorts").hidden = cohorts.length > 0;
  $("#cohort-list").replaceChildren(
    ...cohorts.map((c) => {
      const result = lastResult(c);
      return el(
        "li",
        { class: c.id === open ? "active" : "" },
        el(
          "a",
          { href: `#/cohorts/${c.id}`, "data-id": c.id },
          el("span", { class: "cohort-title" }, c.name,
            received[c.id] ? el("span", { class: "badge new", title: "new studies received for this cohort" }, `${received[c.id]} received`) : null),
          el("span", { class: "cohort-line" }, badge(result.state, result.state === "in_progress" ? "running" : null),
            el("span", { class: "muted" }, result.text)),
        ),
      );
    }),
  );
  const select = $("#job-filters [name=cohort_id]");
  const chosen = select.value;
  select.replaceChildren(
    el("option", { value: "" }, "all"),
    ...cohorts.map((c) => el("option", { value: c.id }, c.name)),
  );
  select.value = chosen;
  return cohorts;
}

// --- new cohort --------------------------------------------------------------------------------

function openNew() {
  showView("new-view");
  const problem = $("#cohort-form .form-problem");
  problem.hidden = true;
  $("#cohort-form [name=name]").focus();
}

async function createCohort(event) {
  event.preventDefault();
  const form = event.target;
  const problem = form.querySelector(".form-problem");
  problem.hidden = true;
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
  if (!body.name || !body.source_path) {
    fail(new Error(!body.name ? "Name is required" : "Source path is required"), problem);
    return;
  }
  try {
    const cohort = await api("POST", "/api/cohorts", body);
    form.reset();
    notify(`cohort ${cohort.name} created`, "info");
    location.hash = `#/cohorts/${cohort.id}`;
  } catch (error) {
    fail(error, problem);
  }
}

// --- config forms, generated from GET /api/config-schema ---------------------------------------

async function schemas() {
  if (!configSchema) configSchema = await api("GET", "/api/config-schema");
  return configSchema;
}

function resolve(schema, root) {
  if (schema && schema.$ref) {
    const name = schema.$ref.split("/").pop();
    return { ...root.$defs[name], ...Object.fromEntries(Object.entries(schema).filter(([k]) => k !== "$ref")) };
  }
  return schema || {};
}

// {schema, nullable}: `anyOf: [X, {type: null}]` is X that may be left empty
function unwrap(schema, root) {
  const s = resolve(schema, root);
  if (s.anyOf) {
    const real = s.anyOf.filter((o) => o.type !== "null");
    if (real.length === 1) {
      return { schema: { ...resolve(real[0], root), default: s.default, description: s.description, title: s.title }, nullable: true };
    }
  }
  return { schema: s, nullable: false };
}

function labelOf(key, schema) {
  // a nested model's title is its class name ("PatientIdConfig"): the key reads better
  if (schema.title && !/Config$/.test(schema.title)) return schema.title;
  const words = key.replace(/([a-z])([A-Z])/g, "$1 $2").replaceAll("_", " ");
  return words.charAt(0).toUpperCase() + words.slice(1);
}

// one field: returns {node, read()} where read() gives [present, value]
function fieldFor(key, raw, root, required, path) {
  const { schema, nullable } = unwrap(raw, root);
  const id = `cfg-${path.join("-")}`;
  const help = schema.description ? el("small", {}, schema.description) : null;
  const dflt = schema.default;
  const title = labelOf(key, schema);
  if (schema.type === "object" && schema.properties) {
    const inner = objectFields(schema, root, path);
    const box = el("fieldset", { class: "nested" }, el("legend", {}, title), help, inner.node);
    return { node: box, read: () => {
      const value = inner.read();
      return [Object.keys(value).length > 0, value];
    } };
  }
  if (schema.type === "boolean" && !nullable) {
    const input = el("input", { type: "checkbox", id, name: path.join(".") });
    input.checked = Boolean(dflt);
    return {
      node: el("label", { class: "check" }, input, title, help),
      read: () => [input.checked !== Boolean(dflt), input.checked],
    };
  }
  if (schema.type === "array" && schema.items && (resolve(schema.items, root).enum)) {
    const options = resolve(schema.items, root).enum;
    const chosen = new Set(dflt || []);
    const boxes = options.map((o) => {
      const input = el("input", { type: "checkbox", value: o, name: path.join(".") });
      input.checked = chosen.has(o);
      return { o, input };
    });
    const hint = dflt === undefined ? el("small", { class: "hint" }, "none ticked: the stage's default") : null;
    const node = el("fieldset", { class: "choices" }, el("legend", {}, title),
      boxes.map(({ o, input }) => el("label", { class: "check" }, input, o)), help, hint);
    return {
      node,
      read: () => {
        const value = boxes.filter((b) => b.input.checked).map((b) => b.o);
        const same = value.length === chosen.size && value.every((v) => chosen.has(v));
        return [!same, value];
      },
    };
  }
  let input;
  const enumValues = schema.enum || (schema.type === "boolean" ? [true, false] : null);
  if (enumValues) {
    input = el("select", { id, name: path.join(".") },
      !required ? el("option", { value: "" }, dflt === undefined || dflt === null ? "(default)" : `(default: ${dflt})`) : null,
      enumValues.map((v) => el("option", { value: JSON.stringify(v) }, String(v))));
  } else if (schema.type === "integer" || schema.type === "number") {
    input = el("input", { id, type: "number", name: path.join("."), min: schema.minimum, max: schema.maximum,
      step: schema.type === "integer" ? 1 : "any", placeholder: dflt === undefined || dflt === null ? "default" : String(dflt) });
  } else if (schema.type === "array" && schema.prefixItems) {
    input = el("input", { id, name: path.join("."), placeholder: "min, max" });
  } else {
    const secret = schema.format === "password" || schema.writeOnly;
    input = el("input", { id, name: path.join("."), type: secret ? "password" : "text", autocomplete: secret ? "new-password" : "off",
      placeholder: dflt === undefined || dflt === null ? "" : String(dflt) });
    if (secret) input.dataset.secret = "true";
  }
  const range = schema.minimum !== undefined || schema.maximum !== undefined
    ? el("small", {}, `from ${schema.minimum ?? "…"} to ${schema.maximum ?? "…"}`) : null;
  const min = schema.minLength > 1 ? el("small", {}, `at least ${schema.minLength} characters`) : null;
  return {
    node: el("label", { for: id }, `${title}${required ? " *" : ""}`, input, help, range, min),
    read: () => {
      const text = input.value.trim();
      if (text === "") return [false, undefined];
      if (input.tagName === "SELECT") return [true, JSON.parse(text)];
      if (input.type === "number") return [true, Number(text)];
      if (schema.prefixItems) return [true, text.split(",").map((p) => Number(p.trim()))];
      return [true, input.value];
    },
  };
}

function objectFields(schema, root, path) {
  const required = new Set(schema.required || []);
  const fields = Object.entries(schema.properties || {}).map(([key, sub]) => ({
    key,
    field: fieldFor(key, sub, root, required.has(key), [...path, key]),
  }));
  return {
    node: el("div", { class: "grid-form" }, fields.map((f) => f.field.node)),
    read: () => {
      const out = {};
      for (const { key, field } of fields) {
        const [present, value] = field.read();
        if (present) out[key] = value;
      }
      return out;
    },
  };
}

// a stage's settings: the generated form, and raw JSON as the advanced view
function stageSection(stage, schema) {
  const form = objectFields(schema, schema, [stage]);
  const raw = el("textarea", { rows: "6", spellcheck: "false", class: "raw-json", name: `${stage}-json` });
  const rawBox = el("div", { hidden: true }, el("small", { class: "muted" }, "The same settings as JSON (what is sent)."), raw);
  const toggle = el("label", { class: "check advanced" }, el("input", { type: "checkbox" }), "Advanced: edit as JSON");
  const check = toggle.querySelector("input");
  check.addEventListener("change", () => {
    if (check.checked) raw.value = JSON.stringify(form.read(), null, 2);
    rawBox.hidden = !check.checked;
    form.node.hidden = check.checked;
  });
  return {
    node: el("div", { class: "stage-config", "data-stage": stage }, form.node, toggle, rawBox),
    read: () => {
      if (!check.checked) return form.read();
      try {
        return JSON.parse(raw.value || "{}");
      } catch (error) {
        throw new Error(`${STAGE_LABELS[stage]} settings are not valid JSON: ${error.message}`);
      }
    },
    clearSecrets: () => {
      for (const input of form.node.querySelectorAll("input[data-secret]")) input.value = "";
      raw.value = "";
    },
  };
}

async function showStageForm(cohortId, stage, gen) {
  const all = await schemas();
  if (gen !== generation) return;
  const section = stageSection(stage, all[stage]);
  const problem = el("p", { class: "problem form-problem", role: "alert", hidden: true });
  const form = $("#stage-form");
  form.replaceChildren(
    section.node,
    problem,
    el("div", { class: "actions" },
      el("button", { type: "submit" }, `Run ${STAGE_LABELS[stage]}`),
      el("button", { type: "button", class: "secondary", onclick: () => ($("#stage-form-box").hidden = true) }, "Close")),
  );
  form.onsubmit = async (event) => {
    event.preventDefault();
    problem.hidden = true;
    try {
      const config = section.read();
      // the cohort this form was opened for, never whatever the page shows later
      await api("POST", `/api/cohorts/${cohortId}/stages/${stage}/run`, { config });
      section.clearSecrets();
      $("#stage-form-box").hidden = true;
      notify(`${STAGE_LABELS[stage]} started`, "info");
      if (gen === generation) await refreshCohort(gen);
    } catch (error) {
      fail(error, problem);
    }
  };
  $("#stage-form-title").textContent = `${STAGE_LABELS[stage]} settings`;
  $("#stage-form-box").hidden = false;
  $("#stage-form-box").scrollIntoView({ block: "nearest" });
}

async function buildPipelineForm(cohort, gen) {
  const all = await schemas();
  if (gen !== generation) return;
  const stages = cohort.stages.map((s) => s.stage);
  const sections = stages.map((stage) => ({ stage, section: stageSection(stage, all[stage]) }));
  const problem = el("p", { class: "problem form-problem", role: "alert", hidden: true });
  const form = $("#pipeline-form");
  form.replaceChildren(
    ...sections.map(({ stage, section }, index) =>
      el("details", { class: "stage-section", open: index === 0 ? true : undefined },
        el("summary", {}, STAGE_LABELS[stage]), section.node)),
    problem,
    el("div", { class: "actions" }, el("button", { type: "submit", id: "run-pipeline" }, "Run pipeline")),
  );
  const cohortId = cohort.id;
  form.onsubmit = async (event) => {
    event.preventDefault();
    problem.hidden = true;
    try {
      const body = {};
      for (const { stage, section } of sections) {
        const config = section.read();
        if (Object.keys(config).length) body[stage] = config;
      }
      const run = await api("POST", `/api/cohorts/${cohortId}/pipeline`, body);
      for (const { section } of sections) section.clearSecrets();
      $("#pipeline-box").open = false;
      notify(`pipeline started: ${run.jobs.map((j) => STAGE_LABELS[j.stage]).join(" → ")}`, "info");
      if (gen === generation) await refreshCohort(gen);
    } catch (error) {
      fail(error, problem);
    }
  };
}

// --- one cohort ---------------------------------------------------------------------------------

async function openCohort(id, gen) {
  // nothing of an earlier cohort stays on the page while this one loads
  $("#cohort-name").textContent = "";
  $("#cohort-facts").replaceChildren();
  $("#stage-table tbody").replaceChildren();
  $("#stage-form-box").hidden = true;
  $("#pipeline-form").replaceChildren();
  $("#series-table tbody").replaceChildren();
  $("#browser").replaceChildren();
  $("#results").replaceChildren();
  $("#results-card").hidden = true;
  $("#no-series").hidden = true;
  let cohort;
  try {
    cohort = await api("GET", `/api/cohorts/${id}`);
  } catch (error) {
    if (gen !== generation) return;
    if (error.status === 404) return showMissing(`There is no cohort with id ${id}: it may have been deleted.`);
    return fail(error);
  }
  if (gen !== generation) return;
  current.cohort = cohort;
  showView("cohort-view");
  renderSidebar(gen).catch(() => {});
  await buildPipelineForm(cohort, gen).catch((error) => fail(error));
  await poll(refreshCohort, gen, "#poll-state");
  loadSeries(gen, true);
}

async function refreshCohort(gen) {
  const id = current.cohort && current.cohort.id;
  if (!id) return false;
  let cohort;
  let jobs;
  try {
    [cohort, jobs] = await Promise.all([
      api("GET", `/api/cohorts/${id}`),
      api("GET", `/api/jobs?cohort_id=${id}&limit=200`),
    ]);
  } catch (error) {
    if (error.status === 404 && gen === generation) {
      // deleted elsewhere (another tab, the CLI): stop asking, say so
      showMissing("This cohort was deleted (perhaps in another tab or with the CLI).");
      renderSidebar(gen).catch(() => {});
      return false;
    }
    throw error;
  }
  if (gen !== generation) return false;
  const before = current.cohort;
  current.cohort = cohort;
  current.jobs = jobs;
  $("#cohort-name").textContent = cohort.name;
  const result = lastResult(cohort);
  $("#cohort-status").replaceWith(Object.assign(badge(result.state, result.text), { id: "cohort-status" }));
  $("#cohort-description").textContent = cohort.description || "";
  $("#cohort-facts").replaceChildren(
    ...facts([
      ["Source", cohort.source_path],
      ["Owner", cohort.owner || "—"],
      ["Tags", cohort.tags.join(", ") || "—"],
      ["Anonymization", cohort.anonymization_enabled ? "enabled" : "off"],
      ["Subjects", cohort.total_subjects],
      ["Sessions", cohort.total_sessions],
      ["Series", cohort.total_series],
      ["Complete", percent(cohort.completion_percentage)],
    ]),
  );
  $("#cohort-progress").style.width = `${cohort.completion_percentage}%`;
  $("#delete-cohort").disabled = cohort.status === "in_progress";
  $("#cohort-jobs-link").href = `#/jobs?cohort_id=${cohort.id}`;
  renderStages(cohort, jobs, gen);
  await renderResults(cohort, jobs, gen);
  // a stage that just finished changes the catalog: reload the series once
  if (before && before.status === "in_progress" && cohort.status !== "in_progress") loadSeries(gen, true);
  // the sidebar follows the cohort's state
  const states = (c) => JSON.stringify([c.status, c.stages.map((s) => [s.state, s.job_id])]);
  if (!before || states(before) !== states(cohort)) renderSidebar(gen).catch(() => {});
  if (before && JSON.stringify(before.stages.map((s) => s.stage)) !== JSON.stringify(cohort.stages.map((s) => s.stage))) {
    await buildPipelineForm(cohort, gen);
  }
  return true;
}

// a job nobody works on keeps its status; the gateway says so in its reason ("stalled: ...")
const isStalled = (job) => Boolean(job && !TERMINAL.has(job.status) && (job.status_reason || "").startsWith("stalled: "));

function jobShownState(job) {
  if (isStalled(job)) return "stalled";
  return job.left_work_behind ? "incomplete" : job.status;
}

function stageShownState(stage, jobs) {
  const job = jobs.find((j) => j.id === stage.job_id);
  if (stage.state === "completed" && job && job.left_work_behind) return "incomplete";
  if (isStalled(job)) return "stalled";
  return stage.state;
}

function renderStages(cohort, jobs, gen) {
  const busy = cohort.status === "in_progress";
  $("#stage-table tbody").replaceChildren(
    ...cohort.stages.map((s, index) => {
      const before = index === 0 ? null : cohort.stages[index - 1];
      const ready = !busy && (before === null || before.state === "completed");
      const run = el(
        "button",
        { class: "secondary", type: "button", "data-stage": s.stage, onclick: () => showStageForm(cohort.id, s.stage, gen).catch(fail) },
        s.state === "completed" ? "Run again" : "Run",
      );
      run.disabled = !ready;
      run.title = ready ? "" : busy ? "a job is in progress" : `needs ${STAGE_LABELS[before.stage]} completed first`;
      const cancel = s.job_id && (s.state === "running" || s.state === "pending")
        ? el("button", { class: "danger", type: "button", onclick: () => cancelJob(s.job_id) }, "Cancel")
        : null;
      const shown = stageShownState(s, jobs);
      const done = s.state === "completed" ? 100 : s.progress;
      return el(
        "tr",
        {},
        el("td", {}, STAGE_LABELS[s.stage] || s.stage),
        el("td", {}, badge(shown)),
        el("td", {}, bar(done, s.state), el("small", { class: "muted" }, percent(done))),
        el("td", {}, s.job_id ? el("a", { href: `#/jobs/${s.job_id}`, class: "mono" }, s.job_id.slice(0, 8)) : ""),
        el("td", {}, el("div", { class: "buttons" }, run, cancel)),
      );
    }),
  );
}

// --- results: what each stage's last completed job says ------------------------------------------

function lastCompleted(jobs, stage) {
  return jobs.find((j) => j.stage === stage && j.status === "completed");
}

async function signed(path) {
  if (!token()) return path;
  const link = await api("POST", "/api/download-links", { path });
  return link.url;
}

function validatorReport(v) {
  if (!v) return el("p", { class: "muted" }, "No validator report.");
  if (v.skipped) return el("p", { class: "muted" }, `Validation skipped: ${v.skipped}`);
  if (v.error) return el("p", { class: "problem" }, `The BIDS validator did not run: ${v.error}`);
  const verdict = v.errors === 0
    ? el("p", { class: "ok verdict" }, `BIDS validator: valid (${v.warnings} warnings)`)
    : el("p", { class: "problem verdict" }, `BIDS validator: ${v.errors} errors, ${v.warnings} warnings`);
  // by code with counts; every issue (at most 200, errors first) one click away
  const codes = [
    ...Object.entries(v.error_codes || {}).map(([code, n]) => ["error", code, n]),
    ...Object.entries(v.warning_codes || {}).map(([code, n]) => ["warning", code, n]),
  ].map(([severity, code, n]) => el("tr", {}, el("td", {}, badge(severity === "error" ? "failed" : "cancelled", severity)),
    el("td", { class: "mono" }, code), el("td", { class: "num" }, n)));
  const issues = (v.issues || []).map((i) =>
    el("tr", {}, el("td", {}, badge(i.severity === "error" ? "failed" : "cancelled", i.severity)),
      el("td", { class: "mono" }, i.code), el("td", { class: "mono path" }, i.location), el("td", {}, i.message || "")));
  return el("div", { class: "validator" }, verdict,
    codes.length ? table(["Severity", "Code", "Count"], codes) : null,
    issues.length ? el("details", { open: v.errors > 0 ? true : undefined }, el("summary", {}, `Every issue (${issues.length})`),
      table(["Severity", "Code", "Where", "Message"], issues)) : null,
    el("small", { class: "muted" }, `bids-validator ${v.validator_version || ""} schema ${v.schema_version || ""}`));
}

async function renderResults(cohort, jobs, gen) {
  const parts = [];
  const anon = lastCompleted(jobs, "anonymization");
  if (anon) {
    const s = anon.summary || {};
    const refused = (s.refused || []).map((r) =>
      el("tr", {}, el("td", {}, r.reason || r.kind || JSON.stringify(r)), el("td", { class: "num" }, r.files ?? r.count ?? r.n ?? "")));
    const audit = s.audit_object
      ? el("a", { href: "#", class: "button secondary", id: "audit-download",
        onclick: (e) => openSigned(e, `/api/jobs/${anon.id}/audit-export`) }, "Download the encrypted audit export")
      : el("p", { class: "muted" }, `Audit export: ${s.audit_export || "not written"}`);
    parts.push(el("section", { class: "result" }, el("h3", {}, "Anonymization"),
      el("dl", { class: "facts" }, facts([["Files listed", s.files_listed], ["Studies", s.studies_planned],
        ["Studies skipped", s.studies_skipped], ["Files rejected", s.rejected], ["Files left behind", s.left_behind],
        ["Audit subjects", s.audit_subjects], ["Audit files", s.audit_files]])),
      refused.length ? el("div", {}, el("h4", {}, "Refused"), table(["Reason", "Count"], refused)) : null,
      audit));
  }
  const sorting = lastCompleted(jobs, "sorting");
  if (sorting) {
    const s = sorting.summary || {};
    const rows = Object.entries(s.by_intent || {}).map(([intent, n]) => el("tr", {}, el("td", {}, intent), el("td", { class: "num" }, n)));
    parts.push(el("section", { class: "result" }, el("h3", {}, "Sorting"),
      el("dl", { class: "facts" }, facts([["Stacks for review", s.review_required_total], ["Rule version", s.rule_version]])),
      rows.length ? table(["Intent", "Stacks"], rows) : null));
  }
  const exp = lastCompleted(jobs, "export");
  if (exp) {
    const s = exp.summary || {};
    const left = Object.entries(s.not_exported || {}).map(([why, n]) => el("tr", {}, el("td", {}, why), el("td", { class: "num" }, n)));
    const section = el("section", { class: "result", id: "export-result" }, el("h3", {}, "BIDS export"),
      validatorReport(s.validator),
      el("dl", { class: "facts" }, facts([["Stacks exported", s.stacks_with_output], ["Files", s.files_total],
        ["Size", size(s.bytes_total)], ["Exported though flagged", s.review_required_exported],
        ["Copied to", s.destination ? s.destination.location : null]])),
      left.length ? el("div", {}, el("h4", {}, "Not exported"), table(["Why", "Stacks"], left)) : null,
      el("div", { id: "export-files" }));
    parts.push(section);
  }
  if (gen !== generation) return;
  $("#results-card").hidden = parts.length === 0;
  // keep the export file list when nothing changed (it is fetched once per export job)
  const files = $("#export-files");
  const kept = files && exp && current.exportShown === exp.id ? files.cloneNode(true) : null;
  $("#results").replaceChildren(...parts);
  if (exp) {
    if (kept) $("#export-files").replaceWith(kept);
    else await renderExportFiles(cohort.id, exp, gen);
  }
}

async function renderExportFiles(cohortId, job, gen) {
  const listing = await api("GET", `/api/cohorts/${cohortId}/exports/${job.id}`);
  if (gen !== generation) return;
  current.exportShown = job.id;
  const rows = listing.files.map((f) =>
    el("tr", {},
      // signed links: they open in a new tab even when the API needs a token
      el("td", { class: "path" }, el("a", { href: f.download_url, target: "_blank", rel: "noopener" }, f.path)),
      el("td", {}, f.kind || ""),
      el("td", { class: "num" }, size(f.size))));
  $("#export-files").replaceChildren(
    el("h4", {}, `${listing.files.length} files, export job ${job.id.slice(0, 8)}, finished ${when(job.finished_at)}`),
    table(["Path", "Kind", "Size"], rows));
}

async function openSigned(event, path) {
  event.preventDefault();
  const tab = window.open("about:blank", "_blank");
  try {
    const url = await signed(path);
    if (tab) tab.location = url;
    else location.assign(url);
  } catch (error) {
    if (tab) tab.close();
    fail(error);
  }
}

// --- review and correction ----------------------------------------------------------------------

function bidsName(st) {
  if (st.intent === "excluded") return "excluded";
  if (!st.bids_datatype) return st.base === null && st.intent == null ? "not sorted" : "no BIDS name";
  const entities = Object.entries(st.entities || {}).map(([k, v]) => `${k}-${v}`).join("_");
  return `${st.bids_datatype}/${entities ? `${entities}_` : ""}${st.bids_suffix || "?"}`;
}

// `automatic` (after a stage ended): the open correction form is not swept away under the user
// (nor by a reload asked for before the form was opened)
let editorsOpened = 0;

async function loadSeries(gen, automatic = false) {
  const cohort = current.cohort;
  if (!cohort) return;
  const opened = editorsOpened;
  try {
    const series = await api("GET", `/api/cohorts/${cohort.id}/series`);
    if (gen !== generation) return;
    const editing = $("#series-table tr.editor");
    if (editing && (automatic || opened !== editorsOpened)) return;
    current.series = series;
    renderSeries();
    renderBrowser(gen);
    renderRules(await api("GET", `/api/cohorts/${cohort.id}/mapping-rules?history=true`), gen);
  } catch (error) {
    if (gen === generation) fail(error);
  }
}

function renderSeries() {
  const series = current.series || [];
  const onlyReview = $("#only-review").checked;
  $("#no-series").hidden = series.length > 0;
  const rows = [];
  for (const s of series) {
    for (const st of s.stacks) {
      if (onlyReview && !st.review_required) continue;
      const reasons = (st.review_reasons || []).join("; ");
      const row = el(
        "tr",
        { class: st.review_required ? "flagged" : "", "data-series": s.series_instance_uid, "data-stack": st.stack_key },
        el("td", { class: "mono" }, s.subject_id || ""),
        el("td", {}, el("b", {}, s.series_number ?? ""), " ", s.description || "", el("div", { class: "muted small" }, s.modality || "")),
        el("td", { class: "mono small stack-key" }, st.stack_key, el("div", { class: "muted" }, `${st.n_instances ?? "?"} images`)),
        el("td", { class: "mono bids-name" }, bidsName(st),
          st.set_by === "person" && st.proposed ? el("div", { class: "muted small" }, `sorter: ${bidsName({ ...st, ...st.proposed })}`) : null),
        el("td", { class: "num" }, st.confidence == null ? "" : st.confidence.toFixed(2)),
        el("td", { class: "reasons" }, st.review_required ? el("span", { class: "badge failed" }, "review") : null, " ", reasons),
        el("td", {}, st.set_by === "person" ? badge("completed", "set by a person") : st.set_by ? "sorter" : ""),
        el("td", {}, st.set_by ? el("button", { type: "button", class: "secondary correct", onclick: () => editStack(row, s, st) }, "Correct") : null),
      );
      rows.push(row);
    }
  }
  $("#series-table tbody").replaceChildren(...rows);
}

function renderRules(rules, gen) {
  if (gen !== generation) return;
  const what = (r) => {
    if (r.withdrawn) return "given back to the sorter";
    if (r.excluded) return "excluded";
    return bidsName({ ...r, intent: r.bids_datatype });
  };
  $("#rules").replaceChildren(rules.length
    ? table(["Version", "Series", "Stack", "Named", "Sorter proposed", "By", "When"], rules.map((r) => el("tr", {},
      el("td", { class: "num" }, r.version), el("td", {}, r.series_description), el("td", { class: "mono small stack-key" }, r.stack_key),
      el("td", { class: "mono" }, what(r)),
      el("td", { class: "mono" }, r.proposed && r.proposed.bids_datatype ? bidsName(r.proposed) : ""),
      el("td", {}, r.author), el("td", {}, when(r.created_at)))))
    : el("p", { class: "muted" }, "No correction yet."));
}

function editStack(row, series, stack) {
  editorsOpened += 1;
  const next = row.nextElementSibling;
  if (next && next.classList.contains("editor")) {
    next.remove();
    return;
  }
  const datatype = el("select", { name: "bids_datatype" }, DATATYPES.map((d) => el("option", { value: d }, d)));
  datatype.value = stack.bids_datatype || "anat";
  const suffix = el("input", { name: "bids_suffix", value: stack.bids_suffix || "", placeholder: "T1w", maxlength: "32" });
  const entities = el("input", { name: "entities", placeholder: "acq=ax, run=1",
    value: Object.entries(stack.entities || {}).map(([k, v]) => `${k}=${v}`).join(", ") });
  const exclude = el("input", { type: "checkbox", name: "excluded" });
  exclude.checked = stack.intent === "excluded" && stack.set_by === "person";
  const problem = el("p", { class: "problem form-problem", role: "alert", hidden: true });
  const cohortId = current.cohort.id;
  const gen = generation;
  const save = async (withdraw) => {
    problem.hidden = true;
    const parsed = {};
    for (const part of entities.value.split(",").map((p) => p.trim()).filter(Boolean)) {
      const [k, v] = part.split("=").map((p) => (p || "").trim());
      if (!k || !v) {
        fail(new Error(`entities: write name=value pairs, like acq=ax (not "${part}")`), problem);
        return;
      }
      parsed[k] = v;
    }
    const body = {
      series_description: series.description || "",
      stack_key: stack.stack_key,
      bids_datatype: datatype.value,
      bids_suffix: suffix.value.trim(),
      entities: parsed,
      excluded: exclude.checked,
      withdrawn: withdraw,
      proposed: stack.proposed || {},
    };
    try {
      const rule = await api("POST", `/api/cohorts/${cohortId}/mapping-rules`, body);
      notify(`saved as rule version ${rule.version} (by ${rule.author}); run the export again to use it`, "info");
      if (gen === generation) await loadSeries(gen);
    } catch (error) {
      fail(error, problem);
    }
  };
  const editor = el("tr", { class: "editor" }, el("td", { colspan: "8" },
    el("div", { class: "grid-form" },
      el("label", {}, "Datatype", datatype),
      el("label", {}, "Suffix", suffix),
      el("label", {}, "Entities", entities, el("small", {}, "name=value, comma separated (acq, ce, rec, dir, run, echo, part, inv, task)")),
      el("label", { class: "check" }, exclude, "Exclude this kind of stack from the export")),
    problem,
    el("div", { class: "actions" },
      el("button", { type: "button", class: "save-rule", onclick: () => save(false) }, "Save correction"),
      stack.set_by === "person" ? el("button", { type: "button", class: "secondary", onclick: () => save(true) }, "Give back to the sorter") : null,
      el("button", { type: "button", class: "secondary", onclick: () => editor.remove() }, "Close"))));
  row.after(editor);
  suffix.focus();
}

// --- browser: subject -> session -> series, a thumbnail per stack --------------------------------

function renderBrowser(gen) {
  const series = current.series || [];
  const cohortId = current.cohort.id;
  const subjects = new Map();
  for (const s of series) {
    const subject = s.subject_id || "?";
    if (!subjects.has(subject)) subjects.set(subject, new Map());
    const sessions = subjects.get(subject);
    const session = s.study_instance_uid || "?";
    if (!sessions.has(session)) sessions.set(session, []);
    sessions.get(session).push(s);
  }
  const nodes = [];
  for (const [subject, sessions] of subjects) {
    let index = 0;
    const sessionNodes = [];
    for (const [, list] of sessions) {
      index += 1;
      const cards = list.flatMap((s) => s.stacks.map((st) => {
        const img = el("img", { alt: `middle image of ${s.description || "series"}`, loading: "lazy", class: "thumb" });
        img.dataset.path = `/api/cohorts/${cohortId}/series/${encodeURIComponent(s.series_instance_uid)}/thumbnail?stack_key=${encodeURIComponent(st.stack_key)}`;
        return el("figure", { class: "stack-card" }, img,
          el("figcaption", {}, el("b", {}, s.series_number ?? ""), " ", s.description || "", el("div", { class: "mono small" }, bidsName(st))));
      }));
      sessionNodes.push(el("details", { class: "session" }, el("summary", {}, `session ${index} (${list.length} series)`),
        el("div", { class: "thumbs" }, cards)));
    }
    nodes.push(el("details", { class: "subject" }, el("summary", {}, `subject ${subject}`), sessionNodes));
  }
  $("#browser").replaceChildren(...(nodes.length ? nodes : [el("p", { class: "muted" }, "Nothing catalogued yet.")]));
  // images load when their session is opened
  for (const details of $("#browser").querySelectorAll("details.session")) {
    details.addEventListener("toggle", () => {
      if (!details.open) return;
      for (const img of details.querySelectorAll("img.thumb:not([src])")) {
        signed(img.dataset.path).then((url) => {
          if (gen === generation) img.src = url;
        }).catch(() => {});
        img.addEventListener("error", () => img.replaceWith(el("div", { class: "thumb none" }, "no picture")));
      }
    });
  }
}

// --- Jobs tab -----------------------------------------------------------------------------------

function jobFilters() {
  const query = new URLSearchParams((location.hash.split("?")[1]) || "");
  return { cohort_id: query.get("cohort_id") || "", stage: query.get("stage") || "", status: query.get("status") || "" };
}

async function openJobs(gen) {
  showView("jobs-view");
  const filters = jobFilters();
  await renderSidebar(gen).catch(() => {});
  for (const [key, value] of Object.entries(filters)) $(`#job-filters [name=${key}]`).value = value;
  await poll(() => renderJobList(gen, filters), gen, "#jobs-poll-state");
}

async function renderJobList(gen, filters) {
  const query = new URLSearchParams({ limit: "200" });
  for (const [key, value] of Object.entries(filters)) if (value) query.set(key, value);
  const [jobs, cohorts] = await Promise.all([api("GET", `/api/jobs?${query}`), api("GET", "/api/cohorts")]);
  if (gen !== generation) return false;
  const names = Object.fromEntries(cohorts.map((c) => [c.id, c.name]));
  $("#no-jobs").hidden = jobs.length > 0;
  $("#job-table tbody").replaceChildren(...jobs.map((j) => el("tr", { class: "clickable", onclick: () => (location.hash = `#/jobs/${j.id}`) },
    el("td", {}, names[j.cohort_id] || j.cohort_id.slice(0, 8)),
    el("td", {}, el("a", { href: `#/jobs/${j.id}` }, STAGE_LABELS[j.stage]), j.scoped ? el("span", { class: "muted" }, " (study)") : null),
    el("td", {}, badge(jobShownState(j))),
    el("td", {}, bar(j.progress, j.status), el("small", { class: "muted" }, percent(j.progress))),
    el("td", {}, when(j.created_at)),
    el("td", {}, when(j.finished_at)))));
  return true;
}

function filtersChanged() {
  const data = new FormData($("#job-filters"));
  const query = new URLSearchParams();
  for (const [key, value] of data) if (value) query.set(key, value);
  location.hash = `#/jobs${query.toString() ? `?${query}` : ""}`;
}

// --- one job --------------------------------------------------------------------------------------

// a job's problems grouped by their reason, with counts: the same message from a thousand files
// is one line; notes about skipped files (not DICOM) under a job that failed nothing are notes
function groupedErrors(job) {
  const groups = new Map();
  for (const e of job.errors) {
    const reason = e.message.replace(/\s+/g, " ").trim();
    if (!groups.has(reason)) groups.set(reason, []);
    groups.get(reason).push(e.item);
  }
  const rows = [...groups.entries()].sort((a, b) => b[1].length - a[1].length).map(([reason, items]) =>
    el("tr", {}, el("td", { class: "num" }, items.length), el("td", {}, reason),
      el("td", { class: "mono small" }, items.slice(0, 3).join(", ") + (items.length > 3 ? ", …" : ""))));
  if (!rows.length) return el("p", { class: "muted" }, "None.");
  const skipped = job.items_failed === 0;
  return el("div", {},
    el("p", { class: skipped ? "muted" : "problem" }, skipped
      ? `${job.errors.length} files were skipped (not DICOM or not readable); nothing failed.`
      : `${job.items_failed} work items failed; ${job.errors.length} problems recorded.`),
    table(["Count", "Reason", "Examples"], rows));
}

function masked(value) {
  if (Array.isArray(value)) return value.map(masked);
  if (value && typeof value === "object") {
    return Object.fromEntries(Object.entries(value).map(([k, v]) => [k, /password|secret|token/i.test(k) ? "***" : masked(v)]));
  }
  return value;
}

function summaryView(job) {
  const s = job.summary || {};
  if (job.stage === "export" && s.validator) {
    return el("div", {}, validatorReport(s.validator), plainFacts(s, ["validator", "not_exported_stacks", "failed_stacks", "warnings", "incomplete_images", "destination"]));
  }
  return plainFacts(s, ["refused"]);
}

function plainFacts(summary, skip) {
  const pairs = Object.entries(summary).filter(([k]) => !skip.includes(k)).map(([k, v]) =>
    [k.replaceAll("_", " "), typeof v === "object" && v !== null ? JSON.stringify(v) : String(v)]);
  if (!pairs.length) return el("p", { class: "muted" }, "Nothing yet.");
  return el("dl", { class: "facts" }, facts(pairs));
}

async function openJob(id, gen) {
  $("#job-title").textContent = "";
  $("#job-summary").replaceChildren();
  $("#job-errors").replaceChildren();
  let first = true;
  await poll(async () => {
    let job;
    let events;
    try {
      [job, events] = await Promise.all([api("GET", `/api/jobs/${id}`), api("GET", `/api/jobs/${id}/events`)]);
    } catch (error) {
      if (error.status === 404 && gen === generation) {
        showMissing(`There is no job with id ${id}: its cohort may have been deleted.`);
        return false;
      }
      throw error;
    }
    if (gen !== generation) return false;
    if (first) showView("job-view");
    first = false;
    renderJob(job, events);
    return !TERMINAL.has(job.status);
  }, gen);
}

function renderJob(job, events) {
  $("#job-title").textContent = `${STAGE_LABELS[job.stage]} job ${job.id.slice(0, 8)}`;
  $("#job-status").replaceWith(Object.assign(badge(jobShownState(job)), { id: "job-status" }));
  $("#job-reason").textContent = job.status_reason || "";
  $("#job-reason").className = job.status === "failed" || job.left_work_behind || isStalled(job) ? "problem" : "muted";
  const progress = $("#job-progress");
  progress.style.width = `${job.progress}%`;
  progress.parentElement.className = `progress big ${job.status}`;
  const s = job.summary || {};
  const files = s.files_listed ?? s.files_total ?? s.instances;
  $("#job-facts").replaceChildren(...facts([
    ["Progress", percent(job.progress)],
    ["Work items", `${job.items_done} of ${job.items_total} done, ${job.items_failed} failed`],
    ["Files", files === undefined ? null : files],
    ["Created", when(job.created_at)],
    ["Started", when(job.started_at)],
    ["Finished", when(job.finished_at)],
    ["Output", job.output_prefix],
  ]));
  $("#job-cohort-link").href = `#/cohorts/${job.cohort_id}`;
  const cancel = $("#cancel-job");
  cancel.hidden = TERMINAL.has(job.status);
  cancel.onclick = () => cancelJob(job.id);
  $("#job-summary").replaceChildren(summaryView(job));
  $("#job-errors").replaceChildren(groupedErrors(job));
  $("#job-config").textContent = JSON.stringify(masked(job.config), null, 2);
  $("#job-events tbody").replaceChildren(...events.map((e) => el("tr", {},
    el("td", {}, when(e.at)), el("td", {}, e.from_status || ""), el("td", {}, badge(e.to_status)), el("td", {}, e.reason || ""))));
}

async function cancelJob(jobId) {
  if (!confirm("Cancel this job (and the later stages of its run)?")) return;
  try {
    await api("POST", `/api/jobs/${jobId}/cancel`);
    notify("cancel requested", "info");
    route();
  } catch (error) {
    fail(error);
  }
}

async function deleteCohort() {
  const cohort = current.cohort;
  if (!cohort) return;
  if (!confirm(`Delete the cohort ${cohort.name}? Its jobs, catalog and exports in the bucket go with it.`)) return;
  try {
    await api("DELETE", `/api/cohorts/${cohort.id}`);
    notify(`cohort ${cohort.name} deleted`, "info");
    location.hash = "#/";
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
  $("#new-cohort").addEventListener("click", () => (location.hash = "#/new"));
  $("#cohort-form").addEventListener("submit", createCohort);
  $("#delete-cohort").addEventListener("click", deleteCohort);
  $("#load-series").addEventListener("click", () => loadSeries(generation));
  $("#only-review").addEventListener("change", renderSeries);
  $("#job-filters").addEventListener("change", filtersChanged);
  window.addEventListener("hashchange", route);
  route();
});
