// Face recognition console: a plain ES module (no framework, no build step, no external assets).
// Every call goes through the public REST API, exactly as a CompreFace client would make it, so this
// file doubles as a worked example of that API (see `call` and the "Request and raw JSON" box).

const API = new URL("../", location.href); // the page is served at <server>/ui/
const KEY_STORE = "facerec.apiKey";
// The admin token: from the URL fragment the server prints (#admin=...; a fragment never travels to the
// server), kept per tab in sessionStorage, sent only as "Authorization: Bearer" to /api/v1/admin/*.
const ADMIN_STORE = "facerec.adminToken";
const ADMIN_FRAGMENT = "admin";
const RECENT_STORE = "facerec.recentKeys";
const RECENT_MAX = 6;
const FACES_PAGE = 24; // examples fetched per subject card (and per "Show more")
const SUBJECTS_SHOWN = 100; // more than this: narrow the filter (collections can hold thousands)
const FACE_MIME = "application/x-facerec-image-id"; // drag payload of a stored face thumbnail
const COLORS = { match: "#1b9e3e", nomatch: "#e07b00", detect: "#1f6feb", source: "#8e44ad", landmark: "#ff2d55" };
const MODES = {
  // mode -> key type that may call it
  "recognize": "recognition",
  "verify-face": "recognition",
  "detect": "detection",
  "verify": "verification",
};

// ------------------------------------------------------------------------------------------ helpers
const $ = (selector, root = document) => root.querySelector(selector);
const $$ = (selector, root = document) => [...root.querySelectorAll(selector)];

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (value === undefined || value === null || value === false) continue;
    if (name === "class") node.className = value;
    else if (name === "text") node.textContent = value;
    else if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
    else if (name === "dataset") Object.assign(node.dataset, value);
    else node.setAttribute(name, value === true ? "" : value);
  }
  node.append(...children.filter((c) => c !== null && c !== undefined));
  return node;
}

const plural = (n, word) => `${n} ${word}${n === 1 ? "" : "s"}`;
// Truncated, not rounded: a probability of 0.99999 must not read as a certain 1.000.
const short = (v) => (typeof v === "number" ? (Math.floor(v * 1000) / 1000).toFixed(3) : "?");
const enc = encodeURIComponent;

/** Indented JSON, with arrays of plain numbers (landmarks, embeddings) kept on one line. */
function pretty(data) {
  return JSON.stringify(data, null, 2).replace(/\[\s*(-?[\d.eE+-]+(?:,\s*-?[\d.eE+-]+)*)\s*\]/g,
    (_, inner) => `[${inner.split(/,\s*/).join(", ")}]`);
}

/** A failed call: the service's own {"message","code"} when it sent one. */
class ApiError extends Error {
  constructor(status, code, message, body) {
    super(message);
    this.status = status;
    this.code = code;
    this.body = body;
  }
}

// ------------------------------------------------------------------------------------------ state
const state = {
  key: "",
  keyType: null, // "recognition" | "detection" | "verification"
  subjects: [],
  thumbs: new Map(), // image_id -> Promise<blob URL>; stored images never change, so they are cached
  files: { source: null, target: null },
  maxFileSize: null,
};

// ------------------------------------------------------------------------------------------ the REST API
function apiUrl(path, params = {}) {
  const url = new URL(path, API);
  for (const [name, value] of Object.entries(params)) {
    if (value !== "" && value !== null && value !== undefined) url.searchParams.set(name, value);
  }
  return url;
}

/**
 * One REST call. `form` is a FormData (multipart, part names as the API wants them), `json` a body.
 * Resolves to {data, status, ms}; rejects with ApiError carrying the service's message and code.
 */
async function call(method, path, { params, json, form, key = state.key, blob = false, admin = false } = {}) {
  const headers = {};
  if (admin) headers["Authorization"] = `Bearer ${adminToken()}`;
  else if (key) headers["x-api-key"] = key;
  let body;
  if (json !== undefined) {
    headers["Content-Type"] = "application/json";
    body = JSON.stringify(json);
  } else if (form) {
    body = form; // the browser writes the multipart boundary itself
  }
  const url = apiUrl(path, params);
  const started = performance.now();
  let res;
  try {
    res = await fetch(url, { method, headers, body });
  } catch (err) {
    throw new ApiError(0, null, `The server cannot be reached (${err.message})`, null);
  }
  if (blob && res.ok) return { data: await res.blob(), status: res.status, ms: performance.now() - started };
  const text = await res.text();
  const ms = performance.now() - started;
  let data = null;
  try {
    data = text ? JSON.parse(text) : null;
  } catch {
    data = null; // not JSON: a proxy's HTML page, or an empty body
  }
  if (!res.ok) {
    if (data && typeof data.message === "string") throw new ApiError(res.status, data.code ?? null, data.message, data);
    const detail = text ? text.replace(/<[^>]*>/g, " ").replace(/\s+/g, " ").trim().slice(0, 300) : "empty body";
    throw new ApiError(res.status, null, `HTTP ${res.status} ${res.statusText}: ${detail}`, text);
  }
  return { data, status: res.status, ms };
}

/** The same call written as curl, shown next to the raw JSON so the page teaches the API. */
function asCurl(method, path, params, parts) {
  const lines = [`curl -X ${method} "${apiUrl(path, params)}"`, `  -H "x-api-key: ${state.key}"`];
  for (const [name, file] of parts) lines.push(`  -F ${name}=@"${file.name || "image.jpg"}"`);
  return lines.join(" \\\n");
}

// ------------------------------------------------------------------------------------------ messages
function describe(err) {
  if (err instanceof ApiError) {
    const title = err.code !== null && err.code !== undefined ? `Error ${err.code}` : "Error";
    return { title: err.status ? `${title} (HTTP ${err.status})` : title, message: err.message };
  }
  return { title: "Error", message: err && err.message ? err.message : String(err) };
}

/** Shows one error, or a list of [context, error] pairs, in the error box. */
function showError(err, context = "") {
  showErrors([[context, err]]);
}

function showErrors(items) {
  const box = $("#error");
  const list = $("#error-list");
  list.replaceChildren();
  const [context, first] = items[0];
  const { title, message } = describe(first);
  $("#error-title").textContent = items.length === 1 ? title + ":" : `${items.length} errors:`;
  $("#error-message").textContent = items.length === 1 ? (context ? `${context}: ${message}` : message) : "";
  if (items.length > 1) {
    for (const [ctx, err] of items) {
      const d = describe(err);
      list.append(el("li", { text: `${ctx ? ctx + ": " : ""}${d.title}: ${d.message}` }));
    }
  }
  box.dataset.code = first instanceof ApiError && first.code !== null ? String(first.code) : "";
  box.dataset.status = first instanceof ApiError ? String(first.status) : "";
  box.hidden = false;
  $("#notice").hidden = true; // an older "done" message next to a fresh error would mislead
}

function clearError() {
  $("#error").hidden = true;
  $("#error").dataset.code = "";
}

let noticeTimer = null;
function notice(text) {
  const box = $("#notice");
  box.textContent = text;
  box.hidden = false;
  clearTimeout(noticeTimer);
  noticeTimer = setTimeout(() => (box.hidden = true), 6000);
}

// ------------------------------------------------------------------------------------------ API key
function recentKeys() {
  try {
    const list = JSON.parse(localStorage.getItem(RECENT_STORE) || "[]");
    return Array.isArray(list) ? list : [];
  } catch {
    return [];
  }
}

function renderRecent() {
  $("#recent-keys").replaceChildren(
    ...recentKeys().map((k) => el("option", { value: k.key, label: k.type ? `${k.type} key` : "key" })),
  );
}

function rememberKey(key, type) {
  const list = [{ key, type }, ...recentKeys().filter((k) => k.key !== key)].slice(0, RECENT_MAX);
  localStorage.setItem(RECENT_STORE, JSON.stringify(list));
  localStorage.setItem(KEY_STORE, key);
  renderRecent();
}

function forgetKey() {
  const key = $("#api-key").value.trim() || state.key;
  localStorage.setItem(RECENT_STORE, JSON.stringify(recentKeys().filter((k) => k.key !== key)));
  localStorage.removeItem(KEY_STORE);
  $("#api-key").value = "";
  resetForKey("", null);
  renderRecent();
  notice("The key is forgotten by this browser.");
}

/**
 * Which service a key belongs to, asked of the API itself: the key check runs before anything else,
 * so a key of another type gets 404 code 10, and an empty POST with the right key is refused later
 * (another code) without any image work.
 */
async function detectKeyType(key) {
  let first;
  try {
    const { data } = await call("GET", "api/v1/recognition/subjects", { key });
    state.subjects = data.subjects || [];
    return "recognition";
  } catch (err) {
    if (!(err instanceof ApiError) || err.code !== 10) throw err;
    first = err;
  }
  for (const [type, path] of [["detection", "api/v1/detection/detect"], ["verification", "api/v1/verification/verify"]]) {
    try {
      await call("POST", path, { key });
      return type;
    } catch (err) {
      if (!(err instanceof ApiError) || err.status === 0) throw err;
      if (err.code !== 10) return type;
    }
  }
  throw new ApiError(first.status, first.code, `${first.message}, nor is it a detection or verification key`, first.body);
}

function resetForKey(key, type) {
  state.key = key;
  state.keyType = type;
  state.subjects = [];
  for (const url of state.thumbs.values()) url.then(URL.revokeObjectURL, () => {});
  state.thumbs.clear();
  $("#subjects").replaceChildren();
  $("#collection").hidden = type !== "recognition";
  $("#try").hidden = !type;
  $("#intro").hidden = Boolean(type);
  const info = $("#key-info");
  info.hidden = !type;
  info.textContent = type ? `${type} key` : "";
  info.dataset.type = type || "";
  document.body.dataset.keyType = type || "";
  updateModes();
  markKeyInUse();
}

async function useKey(key) {
  key = key.trim();
  clearError();
  if (!key) {
    showError(new Error("Paste an API key first."));
    return;
  }
  const info = $("#key-info");
  info.hidden = false;
  info.textContent = "checking...";
  let type;
  try {
    type = await detectKeyType(key);
  } catch (err) {
    resetForKey("", null);
    showError(err, "API key");
    return;
  }
  const subjects = state.subjects;
  resetForKey(key, type);
  rememberKey(key, type);
  if (type === "recognition") {
    state.subjects = subjects;
    renderSubjects();
  }
}

// ------------------------------------------------------------------------------------------ API keys (admin)
function adminToken() {
  return sessionStorage.getItem(ADMIN_STORE) || "";
}

/** #admin=<token> in the address: keep the token for this tab and take it out of the address bar. */
function takeAdminTokenFromUrl() {
  const fragment = new URLSearchParams(location.hash.slice(1));
  const token = fragment.get(ADMIN_FRAGMENT);
  if (token === null) return false;
  fragment.delete(ADMIN_FRAGMENT);
  const rest = fragment.toString();
  history.replaceState(history.state, "", location.pathname + location.search + (rest ? `#${rest}` : ""));
  if (token.trim()) sessionStorage.setItem(ADMIN_STORE, token.trim());
  return Boolean(token.trim());
}

function showAdmin(stateName) {
  const panel = $("#admin");
  panel.dataset.state = stateName; // signed-out | off | loading | keys
  $("#admin-token-form").hidden = stateName !== "signed-out";
  $("#admin-off").hidden = stateName !== "off";
  $("#admin-keys").hidden = stateName !== "keys" && stateName !== "loading";
}

function signOutAdmin(message) {
  sessionStorage.removeItem(ADMIN_STORE);
  $("#keys tbody").replaceChildren();
  showAdmin("signed-out");
  if (message) notice(message);
}

/** Lists the keys; a wrong token (401) signs out, an admin API that is off (404) says so. */
async function loadKeys() {
  if (!adminToken()) {
    showAdmin("signed-out");
    return;
  }
  showAdmin("loading");
  let data;
  try {
    ({ data } = await call("GET", "api/v1/admin/keys", { admin: true }));
  } catch (err) {
    if (err instanceof ApiError && err.status === 404) {
      sessionStorage.removeItem(ADMIN_STORE);
      showAdmin("off");
    } else {
      if (err instanceof ApiError && err.status === 401) signOutAdmin();
      showError(err, "Admin token");
    }
    return;
  }
  renderKeys(data.keys || []);
  showAdmin("keys");
}

function renderKeys(keys) {
  $("#keys tbody").replaceChildren(...keys.map(keyRow));
  $("#keys").hidden = !keys.length;
  $("#keys-empty").hidden = Boolean(keys.length);
}

function keyRow(k) {
  const name = el("td", { class: "key-name", text: k.name || "" });
  const row = el(
    "tr",
    { dataset: { key: k.key, type: k.type, name: k.name || "" }, class: k.key === state.key ? "in-use" : "" },
    name,
    el("td", {}, el("span", { class: "badge", dataset: { type: k.type }, text: k.type })),
    el("td", {}, el("code", { class: "key-value", text: k.key })),
    el("td", { class: "muted", text: (k.created || "").slice(0, 19).replace("T", " ") }),
    el(
      "td",
      { class: "actions" },
      el("button", { type: "button", class: "use", text: "Use", onclick: () => useListedKey(k.key) }),
      el("button", { type: "button", class: "secondary rename-key", text: "Rename", onclick: () => startKeyRename(row, k) }),
      el("button", { type: "button", class: "danger revoke", text: "Revoke", onclick: () => revokeKey(k) }),
    ),
  );
  return row;
}

async function useListedKey(key) {
  $("#api-key").value = key;
  await useKey(key);
}

function markKeyInUse() {
  for (const row of $$("#keys tbody tr")) row.classList.toggle("in-use", row.dataset.key === state.key);
}

async function createKey(type, name) {
  clearError();
  let data;
  try {
    ({ data } = await call("POST", "api/v1/admin/keys", { admin: true, json: { type, name } }));
  } catch (err) {
    showError(err, `Creating a ${type} key`);
    return;
  }
  $("#new-key-name").value = "";
  await loadKeys();
  if (!state.key) {
    await useListedKey(data.key); // nothing in use yet: start working with the new key at once
    notice(`${type} key created, and in use.`);
  } else {
    notice(`${type} key created: press its Use button to work with it.`);
  }
}

function startKeyRename(row, k) {
  const cell = $(".key-name", row);
  const input = el("input", { value: k.name || "", maxlength: "200", "aria-label": `New name for key ${k.key}` });
  const form = el(
    "form",
    { class: "rename" },
    input,
    el("button", { type: "submit", text: "Save" }),
    el("button", { type: "button", class: "secondary", text: "Cancel", onclick: () => loadKeys() }),
  );
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    clearError();
    try {
      await call("PATCH", `api/v1/admin/keys/${enc(k.key)}`, { admin: true, json: { name: input.value.trim() } });
    } catch (err) {
      showError(err, "Renaming the key");
      return;
    }
    notice("Key renamed.");
    await loadKeys();
  });
  cell.replaceChildren(form);
  input.select();
}

async function revokeKey(k) {
  const what = k.type === "recognition" ? " Its collection (every subject and example) is deleted too." : "";
  if (!confirm(`Revoke the ${k.type} key ${k.name ? `"${k.name}" ` : ""}(${k.key})? Clients using it stop working.${what}`)) return;
  clearError();
  try {
    await call("DELETE", `api/v1/admin/keys/${enc(k.key)}`, { admin: true });
  } catch (err) {
    showError(err, "Revoking the key");
    return;
  }
  localStorage.setItem(RECENT_STORE, JSON.stringify(recentKeys().filter((r) => r.key !== k.key)));
  renderRecent();
  if (state.key === k.key) {
    localStorage.removeItem(KEY_STORE);
    $("#api-key").value = "";
    resetForKey("", null);
  }
  notice(`Key ${k.name || k.key} revoked.`);
  await loadKeys();
}

// ------------------------------------------------------------------------------------------ subjects
async function loadSubjects() {
  try {
    const { data } = await call("GET", "api/v1/recognition/subjects");
    state.subjects = data.subjects || [];
  } catch (err) {
    showError(err, "Listing subjects");
    return;
  }
  renderSubjects();
}

function renderSubjects() {
  const filter = $("#subject-filter").value.trim().toLowerCase();
  const all = [...state.subjects].sort((a, b) => a.localeCompare(b));
  const shown = filter ? all.filter((s) => s.toLowerCase().includes(filter)) : all;
  $("#subject-count").textContent = `(${all.length})`;
  $("#subjects").replaceChildren(...shown.slice(0, SUBJECTS_SHOWN).map(subjectCard));
  if (!all.length) $("#subjects").append(el("p", { class: "muted empty", text: "No subjects yet: add one above." }));
  const more = $("#subjects-more");
  more.hidden = shown.length <= SUBJECTS_SHOWN;
  more.textContent = `${shown.length - SUBJECTS_SHOWN} more subjects: narrow the filter to see them.`;
}

function subjectCard(name) {
  const faces = el("div", { class: "faces" });
  const count = el("span", { class: "count muted" });
  const more = el("button", { type: "button", class: "secondary more", hidden: true, text: "Show more" });
  const input = el("input", { type: "file", accept: "image/*", multiple: true });
  const card = el(
    "article",
    { class: "subject", dataset: { subject: name } },
    el(
      "header",
      {},
      el("h3", { class: "name", text: name }),
      count,
      el(
        "span",
        { class: "actions" },
        el("button", { type: "button", class: "secondary", text: "Rename", onclick: () => startRename(card, name) }),
        el("button", { type: "button", class: "danger", text: "Delete", onclick: () => deleteSubject(name, card) }),
      ),
    ),
    faces,
    el(
      "footer",
      {},
      el("label", { class: "file" }, "Add photos", input),
      more,
      el("span", { class: "muted drop-hint", text: "or drop photos here" }),
    ),
  );
  input.addEventListener("change", () => {
    const files = [...input.files];
    input.value = "";
    if (files.length) addExamples(name, files);
  });
  dropZone(card, { onFiles: (files) => addExamples(name, files) });
  loadFaces(card, name, 0);
  return card;
}

async function loadFaces(card, name, page) {
  const faces = $(".faces", card);
  const more = $(".more", card);
  let data;
  try {
    ({ data } = await call("GET", "api/v1/recognition/faces", { params: { subject: name, page, size: FACES_PAGE } }));
  } catch (err) {
    showError(err, `Listing the faces of ${name}`);
    return;
  }
  if (page === 0) faces.replaceChildren();
  $(".count", card).textContent = plural(data.total_elements, "face");
  card.dataset.faceCount = String(data.total_elements);
  for (const face of data.faces) faces.append(thumbnail(face));
  more.hidden = page + 1 >= data.total_pages;
  more.onclick = () => loadFaces(card, name, page + 1);
}

async function reloadCard(name) {
  const old = $$(".subject", $("#subjects")).find((c) => c.dataset.subject === name);
  if (!state.subjects.includes(name) || !old) {
    await loadSubjects(); // a new subject (add-face creates it), or one this page did not show
    return;
  }
  old.replaceWith(subjectCard(name));
}

/** The stored image of an example, fetched with the key header and shown as a blob URL. */
function faceImageUrl(imageId) {
  if (!state.thumbs.has(imageId)) {
    const promise = call("GET", `api/v1/recognition/faces/${enc(imageId)}/img`, { blob: true }).then(({ data }) => {
      if (!data.size) throw new Error("the service keeps no image for this face");
      // The endpoint answers application/octet-stream: retype it so the blob is an image to every viewer.
      return URL.createObjectURL(new Blob([data], { type: "image/jpeg" }));
    });
    promise.catch(() => state.thumbs.delete(imageId));
    state.thumbs.set(imageId, promise);
  }
  return state.thumbs.get(imageId);
}

function thumbnail(face) {
  const img = el("img", { alt: `example of ${face.subject}`, loading: "lazy" });
  const fig = el(
    "figure",
    {
      class: "face loading",
      draggable: "true",
      title: `image_id ${face.image_id}\nclick: verify photos against this face; drag to the bin: delete`,
      dataset: { imageId: face.image_id },
      onclick: () => chooseFaceForVerify(face.image_id),
    },
    img,
    el("button", {
      type: "button",
      class: "del",
      title: "Delete this example",
      "aria-label": "Delete this example",
      text: "\u00d7",
      onclick: (event) => {
        event.stopPropagation();
        deleteFace(face.image_id);
      },
    }),
  );
  fig.addEventListener("dragstart", (event) => {
    event.dataTransfer.setData(FACE_MIME, face.image_id);
    event.dataTransfer.setData("text/plain", face.image_id);
    event.dataTransfer.effectAllowed = "copyMove";
  });
  faceImageUrl(face.image_id).then(
    (url) => {
      img.src = url;
      fig.classList.remove("loading");
    },
    (err) => {
      fig.classList.replace("loading", "broken");
      fig.title += `\n(no image: ${err.message})`;
    },
  );
  return fig;
}

async function addSubject(name) {
  try {
    const { data } = await call("POST", "api/v1/recognition/subjects", { json: { subject: name } });
    notice(`Subject ${data.subject} added.`);
    $("#new-subject").value = "";
  } catch (err) {
    showError(err, `Adding subject ${name}`);
    return;
  }
  await loadSubjects();
}

async function addExamples(name, files) {
  clearError();
  const failed = [];
  let added = 0;
  const card = $$(".subject").find((c) => c.dataset.subject === name);
  card?.classList.add("busy");
  for (const file of files) {
    const form = new FormData();
    form.append("file", file, file.name);
    try {
      await call("POST", "api/v1/recognition/faces", { params: { subject: name }, form });
      added += 1;
    } catch (err) {
      failed.push([file.name, err]);
    }
  }
  card?.classList.remove("busy");
  if (failed.length) showErrors(failed);
  if (added) notice(`${plural(added, "example")} added to ${name}.`);
  await reloadCard(name);
}

async function deleteFace(imageId) {
  let data;
  try {
    ({ data } = await call("DELETE", `api/v1/recognition/faces/${enc(imageId)}`));
  } catch (err) {
    showError(err, "Deleting an example");
    return;
  }
  const url = state.thumbs.get(imageId);
  state.thumbs.delete(imageId);
  url?.then(URL.revokeObjectURL, () => {});
  notice(`Example of ${data.subject} deleted.`);
  if ($("#opt-image-id").value === imageId) $("#opt-image-id").value = "";
  await reloadCard(data.subject);
}

async function deleteSubject(name, card) {
  const n = card.dataset.faceCount ?? "?";
  if (!confirm(`Delete subject "${name}" and its ${n} example(s)?`)) return;
  try {
    await call("DELETE", `api/v1/recognition/subjects/${enc(name)}`);
  } catch (err) {
    showError(err, `Deleting subject ${name}`);
    return;
  }
  notice(`Subject ${name} deleted.`);
  await loadSubjects();
}

function startRename(card, name) {
  const heading = $("h3", card);
  const input = el("input", { value: name, maxlength: "50", "aria-label": `New name for ${name}` });
  const form = el(
    "form",
    { class: "rename" },
    input,
    el("button", { type: "submit", text: "Save" }),
    el("button", { type: "button", class: "secondary", text: "Cancel", onclick: () => form.replaceWith(heading) }),
  );
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const wanted = input.value.trim();
    if (await renameSubject(name, wanted)) return;
    form.replaceWith(heading);
  });
  heading.replaceWith(form);
  input.select();
}

/** PUT /subjects/{name}; renaming onto an existing subject merges the two (the API's rule). */
async function renameSubject(name, wanted) {
  if (!wanted || wanted === name) return false;
  const existing = state.subjects.find((s) => s !== name && s.toLowerCase() === wanted.toLowerCase());
  if (existing && !confirm(`"${existing}" already exists: merge the examples of "${name}" into it?`)) return false;
  let data;
  try {
    ({ data } = await call("PUT", `api/v1/recognition/subjects/${enc(name)}`, { json: { subject: wanted } }));
  } catch (err) {
    showError(err, `Renaming ${name}`);
    return false;
  }
  notice(data.updated ? `${name} is now ${existing || wanted}.` : `${name} was not renamed (the service answered updated: false).`);
  await loadSubjects();
  return true;
}

// ------------------------------------------------------------------------------------------ drag and drop
/** Makes `zone` accept dropped image files and/or stored-face thumbnails. */
function dropZone(zone, { onFiles, onFace }) {
  const accepts = (event) => {
    const types = [...event.dataTransfer.types];
    if (onFace && types.includes(FACE_MIME)) return true;
    return Boolean(onFiles) && types.includes("Files") && !types.includes(FACE_MIME);
  };
  let depth = 0; // dragenter/dragleave fire for every child: count them
  zone.addEventListener("dragenter", (event) => {
    if (!accepts(event)) return;
    event.preventDefault();
    depth += 1;
    zone.classList.add("over");
  });
  zone.addEventListener("dragover", (event) => {
    if (!accepts(event)) return;
    event.preventDefault();
    event.stopPropagation();
    event.dataTransfer.dropEffect = [...event.dataTransfer.types].includes(FACE_MIME) ? "move" : "copy";
  });
  zone.addEventListener("dragleave", () => {
    depth = Math.max(0, depth - 1);
    if (!depth) zone.classList.remove("over");
  });
  zone.addEventListener("drop", (event) => {
    if (!accepts(event)) return;
    event.preventDefault();
    event.stopPropagation();
    depth = 0;
    zone.classList.remove("over");
    const imageId = event.dataTransfer.getData(FACE_MIME);
    if (imageId && onFace) onFace(imageId);
    else if (onFiles) {
      const files = [...event.dataTransfer.files];
      if (files.length) onFiles(files);
    }
  });
}

// ------------------------------------------------------------------------------------------ try an image
function currentMode() {
  return $("input[name=mode]:checked").value;
}

function updateModes() {
  const radios = $$("input[name=mode]");
  for (const radio of radios) {
    const allowed = MODES[radio.value] === state.keyType;
    radio.disabled = !allowed;
    radio.closest("label").hidden = !allowed;
  }
  if ($("input[name=mode]:checked").disabled) {
    const first = radios.find((r) => !r.disabled);
    if (first) first.checked = true;
  }
  const mode = currentMode();
  for (const node of $$("[data-modes]")) node.hidden = !node.dataset.modes.split(" ").includes(mode);
  $("#drop-source-label").textContent = mode === "verify" ? "Drop the source photo here" : "Drop a photo here";
  $("#stage-target").hidden = mode !== "verify" || !state.files.target;
}

function chooseFaceForVerify(imageId) {
  if (state.keyType !== "recognition") return;
  $("#opt-image-id").value = imageId;
  $("input[name=mode][value=verify-face]").checked = true;
  updateModes();
  notice("Verify: drop a photo to compare with this face.");
  $("#try").scrollIntoView({ behavior: "smooth", block: "start" });
}

/** A stored face dropped on the photo zone: use its image (fetched through the API) as the photo. */
async function useStoredFace(imageId, slot) {
  try {
    const url = await faceImageUrl(imageId);
    const blob = await (await fetch(url)).blob();
    await setFile(slot, new File([blob], `${imageId}.jpg`, { type: "image/jpeg" }));
  } catch (err) {
    showError(err, "Using a stored face");
  }
}

async function setFile(slot, file) {
  state.files[slot] = file;
  const limit = state.maxFileSize ? ` (the service accepts up to ${(state.maxFileSize / 1048576).toFixed(0)} MB)` : "";
  $(`#name-${slot}`).textContent = `${file.name}, ${(file.size / 1024).toFixed(0)} KB${limit}`;
  await showImage($(`#stage-${slot}`), file);
  if (currentMode() !== "verify" || (state.files.source && state.files.target)) await run();
  else $("#run-info").textContent = `Now choose the ${state.files.source ? "target" : "source"} photo.`;
}

let runSeq = 0;
async function run() {
  const mode = currentMode();
  const source = state.files.source;
  const target = state.files.target;
  const imageId = $("#opt-image-id").value.trim();
  clearError();
  if (!source) return showError(new Error("Choose or drop a photo first."));
  if (mode === "verify" && !target) return showError(new Error("Verify two images: choose the target photo too."));
  if (mode === "verify-face" && !imageId) {
    return showError(new Error("Pick a stored face to verify against: click one under Subjects, or paste its image_id."));
  }
  const plugins = $$("input[name=plugin]:checked").map((c) => c.value);
  const params = {
    limit: $("#opt-limit").value,
    det_prob_threshold: $("#opt-det-prob").value,
    face_plugins: plugins.join(","),
    status: $("#opt-status").checked ? "true" : "",
  };
  if (mode === "recognize") params.prediction_count = $("#opt-prediction-count").value;
  const parts = mode === "verify" ? [["source_image", source], ["target_image", target]] : [["file", source]];
  const path = {
    "recognize": "api/v1/recognition/recognize",
    "verify-face": `api/v1/recognition/faces/${enc(imageId)}/verify`,
    "detect": "api/v1/detection/detect",
    "verify": "api/v1/verification/verify",
  }[mode];
  const form = new FormData();
  for (const [name, file] of parts) form.append(name, file, file.name || "image.jpg");

  const section = $("#try");
  const seq = ++runSeq; // a newer run supersedes an older one still in flight
  section.dataset.state = "busy";
  $("#run").disabled = true;
  $("#run-info").textContent = "working...";
  $("#raw-request").textContent = asCurl("POST", path, params, parts);
  try {
    const { data, status, ms } = await call("POST", path, { params, form });
    if (seq !== runSeq) return;
    $("#raw-status").textContent = `HTTP ${status}, ${Math.round(ms)} ms`;
    $("#raw-json").textContent = pretty(data);
    render(mode, data);
    $("#run-info").textContent = `${plural(countFaces(mode, data), "face")} in ${Math.round(ms)} ms`;
    section.dataset.state = "done";
  } catch (err) {
    if (seq !== runSeq) return;
    $("#raw-status").textContent = err.status ? `HTTP ${err.status}` : "no answer";
    $("#raw-json").textContent = err.body && typeof err.body === "object" ? pretty(err.body) : String(err.body ?? "");
    render(mode, null);
    $("#run-info").textContent = "failed";
    showError(err, { "recognize": "Recognize", "verify-face": "Verify", "detect": "Detect", "verify": "Verify" }[mode]);
    section.dataset.state = "error";
  } finally {
    if (seq === runSeq) $("#run").disabled = false;
  }
}

function countFaces(mode, data) {
  if (mode === "verify") return (data.result || []).reduce((n, r) => n + (r.face_matches || []).length, 0);
  return (data.result || []).length;
}

// ------------------------------------------------------------------------------------------ drawing
async function showImage(stage, file) {
  const img = $("img", stage);
  if (img.dataset.url) URL.revokeObjectURL(img.dataset.url);
  const url = URL.createObjectURL(file);
  img.dataset.url = url;
  img.src = url;
  stage.hidden = false;
  try {
    await img.decode();
  } catch {
    // Not an image the browser can show; the service will say what it thinks of it.
  }
  const canvas = $("canvas", stage);
  canvas.width = img.naturalWidth || 1;
  canvas.height = img.naturalHeight || 1;
  drawFaces(stage, []);
  $("figcaption", stage).textContent = img.naturalWidth ? `${file.name}: ${img.naturalWidth} \u00d7 ${img.naturalHeight}` : file.name;
}

/** Converts a response into drawable faces per image, draws them and lists them. */
function render(mode, data) {
  const list = $("#result-list");
  list.replaceChildren();
  const match = parseFloat($("#opt-match").value) || 0;
  const sourceItems = [];
  const targetItems = [];
  const result = data ? data.result || [] : [];
  if (mode === "verify") {
    for (const r of result) {
      if (r.source_image_face) {
        sourceItems.push(item(r.source_image_face, "source", COLORS.source));
        list.append(listEntry("Source face", r.source_image_face, []));
      }
      (r.face_matches || []).forEach((m, i) => {
        const color = m.similarity >= match ? COLORS.match : COLORS.nomatch;
        targetItems.push(item(m, `${short(m.similarity)}`, color, { similarity: m.similarity }));
        list.append(listEntry(`Target face ${i + 1}`, m, [`similarity ${m.similarity}`], { similarity: m.similarity }));
      });
    }
  } else {
    result.forEach((face, i) => {
      let label;
      let color = COLORS.detect;
      let extra = {};
      const lines = [];
      if (mode === "recognize") {
        const best = (face.subjects || [])[0];
        label = best ? `${best.subject} ${short(best.similarity)}` : "unknown";
        color = best && best.similarity >= match ? COLORS.match : COLORS.nomatch;
        extra = best ? { subject: best.subject, similarity: best.similarity } : { subject: "" };
        lines.push(
          (face.subjects || []).length
            ? face.subjects.map((s) => `${s.subject} ${s.similarity}`).join(", ")
            : "no subjects in this collection",
        );
      } else if (mode === "verify-face") {
        label = `${face.subject ?? ""} ${short(face.similarity)}`.trim();
        color = face.similarity >= match ? COLORS.match : COLORS.nomatch;
        extra = { subject: face.subject ?? "", similarity: face.similarity };
        lines.push(`similarity ${face.similarity}${face.subject ? ` to ${face.subject}` : ""}`);
      } else {
        label = `face ${short(face.box?.probability)}`;
      }
      sourceItems.push(item(face, label, color, extra));
      list.append(listEntry(`Face ${i + 1}`, face, lines, extra));
    });
  }
  drawFaces($("#stage-source"), sourceItems);
  const target = $("#stage-target");
  if (mode === "verify" && state.files.target) drawFaces(target, targetItems);
  else target.hidden = true;
}

function item(face, label, color, extra = {}) {
  return { box: face.box, landmarks: face.landmarks || [], label, under: ageGender(face), color, ...extra };
}

/** The age and gender plugins' answers, as the page shows them under a face: "female 0.998, 25\u201332". */
function ageGender(face) {
  const parts = [];
  if (face.gender) parts.push(`${face.gender.value} ${short(face.gender.probability)}`);
  if (face.age) parts.push(`${face.age.low}\u2013${face.age.high}`);
  return parts.join(", ");
}

function listEntry(title, face, lines, extra = {}) {
  const b = face.box || {};
  const parts = [`box (${b.x_min}, ${b.y_min})\u2013(${b.x_max}, ${b.y_max}), probability ${b.probability}`, ...lines];
  if (face.age) parts.push(`age ${face.age.low}\u2013${face.age.high} (${short(face.age.probability)})`);
  if (face.gender) parts.push(`gender ${face.gender.value} (${short(face.gender.probability)})`);
  if (face.mask) parts.push(`mask ${face.mask.value} (${short(face.mask.probability)})`);
  if (face.pose) parts.push(`pose pitch ${short(face.pose.pitch)}, roll ${short(face.pose.roll)}, yaw ${short(face.pose.yaw)}`);
  if (face.landmarks && face.landmarks.length) parts.push(`${face.landmarks.length} landmarks`);
  if (face.embedding) parts.push(`embedding of ${face.embedding.length} numbers`);
  const dataset = {};
  if (extra.subject !== undefined) dataset.subject = extra.subject;
  if (extra.similarity !== undefined) dataset.similarity = String(extra.similarity);
  return el("li", { dataset }, el("strong", { text: title + ": " }), parts.join("; "));
}

/** Boxes, landmarks and labels on the canvas over the image, in the image's own pixels. */
function drawFaces(stage, items) {
  const canvas = $("canvas", stage);
  const ctx = canvas.getContext("2d");
  const { width, height } = canvas;
  ctx.clearRect(0, 0, width, height);
  const size = Math.max(width, height);
  const line = Math.max(2, Math.round(size / 250));
  const font = Math.max(12, Math.round(size / 36));
  ctx.font = `600 ${font}px system-ui, sans-serif`;
  ctx.textBaseline = "top";
  for (const it of items) {
    const b = it.box;
    if (!b) continue;
    ctx.lineWidth = line;
    ctx.strokeStyle = it.color;
    ctx.strokeRect(b.x_min, b.y_min, b.x_max - b.x_min, b.y_max - b.y_min);
    ctx.fillStyle = COLORS.landmark;
    for (const [x, y] of it.landmarks) {
      ctx.beginPath();
      ctx.arc(x, y, line * 1.4, 0, 2 * Math.PI);
      ctx.fill();
    }
    const pad = Math.round(font / 4);
    const h = font + 2 * pad;
    const tag = (text, y) => {
      const w = ctx.measureText(text).width + 2 * pad;
      const x = Math.min(Math.max(0, b.x_min - line / 2), Math.max(0, width - w));
      ctx.fillStyle = it.color;
      ctx.fillRect(x, y, w, h);
      ctx.fillStyle = "#fff";
      ctx.fillText(text, x + pad, y + pad);
    };
    if (it.label) tag(it.label, b.y_min - h >= 0 ? b.y_min - h : Math.min(b.y_max, height - h)); // above, else below
    if (it.under) tag(it.under, b.y_max + h <= height ? b.y_max : Math.max(0, b.y_max - h)); // under, else inside
  }
  // For people and tests alike: what was drawn, in the response's coordinates.
  stage.dataset.faces = JSON.stringify(
    items.map(({ box, label, under, landmarks, subject, similarity }) => ({
      box, label, under, landmarks: landmarks.length, subject, similarity,
    })),
  );
  stage.dataset.count = String(items.length);
}

// ------------------------------------------------------------------------------------------ start
function wire() {
  $("#key-form").addEventListener("submit", (event) => {
    event.preventDefault();
    useKey($("#api-key").value);
  });
  $("#forget-key").addEventListener("click", forgetKey);
  $("#error-close").addEventListener("click", clearError);
  $("#add-subject-form").addEventListener("submit", (event) => {
    event.preventDefault();
    clearError();
    addSubject($("#new-subject").value.trim());
  });
  $("#subject-filter").addEventListener("input", renderSubjects);
  $("#reload-subjects").addEventListener("click", () => {
    clearError();
    loadSubjects();
  });
  dropZone($("#trash"), { onFace: deleteFace });
  for (const slot of ["source", "target"]) {
    const input = $(`#file-${slot}`);
    input.addEventListener("change", () => {
      if (input.files.length) setFile(slot, input.files[0]);
      input.value = ""; // choosing the same file again runs again
    });
    dropZone($(`#drop-${slot}`), {
      onFiles: (files) => setFile(slot, files[0]),
      onFace: (imageId) => useStoredFace(imageId, slot),
    });
  }
  for (const radio of $$("input[name=mode]")) radio.addEventListener("change", updateModes);
  $("#try-form").addEventListener("submit", (event) => {
    event.preventDefault();
    run();
  });
  $("#admin-token-form").addEventListener("submit", (event) => {
    event.preventDefault();
    clearError();
    const token = $("#admin-token").value.trim();
    $("#admin-token").value = "";
    if (!token) return showError(new Error("Paste the admin token first."));
    sessionStorage.setItem(ADMIN_STORE, token);
    loadKeys();
  });
  $("#admin-signout").addEventListener("click", () => signOutAdmin("This tab has forgotten the admin token."));
  $("#reload-keys").addEventListener("click", () => {
    clearError();
    loadKeys();
  });
  $("#new-key-form").addEventListener("submit", (event) => {
    event.preventDefault();
    createKey($("#new-key-type").value, $("#new-key-name").value.trim());
  });
  // The printed URL pasted into a tab that already shows the page only changes the fragment.
  window.addEventListener("hashchange", () => {
    if (takeAdminTokenFromUrl()) {
      $("#admin").open = true;
      loadKeys();
    }
  });
  // A file dropped outside every zone must not make the browser navigate away from the page.
  window.addEventListener("dragover", (event) => event.preventDefault());
  window.addEventListener("drop", (event) => event.preventDefault());
}

async function start() {
  const fromUrl = takeAdminTokenFromUrl(); // first, so the token leaves the address bar at once
  wire();
  renderRecent();
  updateModes();
  if (fromUrl || adminToken()) $("#admin").open = true;
  const keys = loadKeys();
  call("GET", "api/v1/config", { key: "" }).then(
    ({ data }) => (state.maxFileSize = data.clientMaxFileSize ?? null),
    () => {},
  );
  const saved = localStorage.getItem(KEY_STORE);
  if (saved) {
    $("#api-key").value = saved;
    await useKey(saved);
  }
  await keys;
  markKeyInUse();
  document.body.dataset.ready = "true";
}

start();
