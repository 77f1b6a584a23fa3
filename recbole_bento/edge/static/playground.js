"use strict";
// The playground calls the public API as any client does (/model_info, /items, /recommend,
// /similar_items). Every value it shows is written as text (textContent), never as HTML, and every
// request is checked against the limits /model_info publishes before it is sent.

const $ = (id) => document.getElementById(id);

const state = {
  info: null,
  history: [], // external ids, oldest first
  attributes: new Map(), // external id -> its attributes (from /items), once looked up
  titleField: null, // the attribute shown next to an id: a token field named like a title
  topk: 10, // of the last answer: the similar items come in the same number
  searchCount: 0, // the latest search; older answers are dropped
  matchesFor: null, // the text the listed matches were found for
};

function el(tag, text, className) {
  const node = document.createElement(tag);
  if (text !== undefined && text !== null) node.textContent = String(text);
  if (className) node.className = className;
  return node;
}

function showError(message) {
  $("error").textContent = message || "";
}

async function call(path, body) {
  const response = await fetch(path, {
    method: "POST",
    headers: { "content-type": "application/json" },
    body: JSON.stringify(body),
  });
  let data = null;
  try {
    data = await response.json();
  } catch (_) {
    data = null;
  }
  if (!response.ok) {
    const reason = data && typeof data.error === "string" ? data.error : `HTTP ${response.status}`;
    throw new Error(`/${path}: ${reason}`);
  }
  return data;
}

function formatValue(value) {
  if (Array.isArray(value)) return value.map(String).join(" ");
  return String(value);
}

function label(id) {
  const attributes = state.attributes.get(id);
  const title = state.titleField && attributes ? attributes[state.titleField] : undefined;
  return title === undefined ? id : `${id} · ${formatValue(title)}`;
}

// ------------------------------------------------------------------ the model

function limit(name, fallback) {
  const limits = (state.info && state.info.limits) || {};
  return Number.isInteger(limits[name]) && limits[name] > 0 ? limits[name] : fallback;
}

function variantNames() {
  const variants = state.info && Array.isArray(state.info.variants) ? state.info.variants : [];
  return variants.map((v) => (v && typeof v.name === "string" ? v.name : null)).filter((n) => n);
}

async function loadModel() {
  let info;
  try {
    info = await call("model_info", {});
  } catch (error) {
    $("model").textContent = `The model could not be read: ${error.message}`;
    return;
  }
  state.info = info;
  const fields = info.filterable_fields || {};
  state.titleField =
    Object.keys(fields).find((name) => /title|name/i.test(name) && fields[name].type !== "float") || null;
  const parts = [
    info.tag,
    info.recbole_model,
    `dataset ${info.dataset}`,
    `${info.item_count} items`,
    `window ${info.max_history_length}`,
    info.device,
  ];
  $("model").textContent = parts.filter((p) => p !== undefined && p !== null).join(" · ");
  const topk = $("topk");
  topk.max = String(limit("max_topk", 1000));
  topk.value = String(Math.min(10, limit("max_topk", 1000)));
  $("user").hidden = !(info.required_inputs || []).includes("user_id");
  if (!info.similar_items) {
    $("explain").checked = false;
    $("explain-row").hidden = true;
  }
  renderFilters(fields);
  renderVariants();
}

function renderFilters(fields) {
  const box = $("filters");
  for (const [name, spec] of Object.entries(fields)) {
    const row = el("div", null, "row filter");
    row.dataset.field = name;
    row.dataset.type = spec.type;
    row.append(el("span", `${name} (${spec.type})`, "name"));
    const examples = Array.isArray(spec.examples) ? spec.examples.map(formatValue).join(", ") : "";
    if (spec.type === "float") {
      for (const bound of ["gte", "lte"]) {
        const input = el("input");
        input.type = "number";
        input.step = "any";
        input.dataset.bound = bound;
        input.placeholder = bound === "gte" ? "at least" : "at most";
        input.setAttribute("aria-label", `${name} ${bound}`);
        row.append(input);
      }
    } else {
      const input = el("input");
      input.type = "text";
      input.placeholder = examples ? `comma-separated, e.g. ${examples}` : "comma-separated values";
      input.setAttribute("aria-label", name);
      row.append(input);
    }
    box.append(row);
  }
  box.hidden = Object.keys(fields).length === 0;
}

function renderVariants() {
  const names = variantNames();
  const box = $("variants");
  if (names.length < 2) return;
  for (const v of state.info.variants) {
    if (!v || typeof v.name !== "string") continue;
    const row = el("div", null, "row");
    const input = el("input");
    input.type = "checkbox";
    input.checked = true;
    input.id = `variant-${names.indexOf(v.name)}`;
    input.dataset.variant = v.name;
    const text = [v.name, v.model, v.weight !== undefined ? `weight ${v.weight}` : null, v.status]
      .filter((p) => p !== undefined && p !== null)
      .join(" · ");
    const tag = el("label", text);
    tag.htmlFor = input.id;
    row.append(input, tag);
    box.append(row);
  }
  box.hidden = false;
}

// ------------------------------------------------------------------ the history

async function describe(ids) {
  const missing = [...new Set(ids)].filter((id) => !state.attributes.has(id));
  const size = limit("max_history", 1000);
  for (let start = 0; start < missing.length; start += size) {
    try {
      const answer = await call("items", { ids: missing.slice(start, start + size) });
      for (const item of answer.items) state.attributes.set(item.id, item.attributes || {});
    } catch (_) {
      return; // a server without /items: ids are shown alone
    }
  }
}

function renderHistory() {
  const list = $("history");
  list.replaceChildren();
  state.history.forEach((id, position) => {
    const row = el("li", null, "chip");
    row.dataset.id = id;
    row.append(el("span", label(id)));
    const remove = el("button", "×", "remove");
    remove.type = "button";
    remove.setAttribute("aria-label", `remove ${id}`);
    remove.addEventListener("click", () => {
      state.history.splice(position, 1);
      renderHistory();
    });
    row.append(remove);
    list.append(row);
  });
}

async function addToHistory(id) {
  const text = String(id).trim();
  if (!text) return;
  if (text.length > 256) return showError("An item id has at most 256 characters.");
  if (state.history.length >= limit("max_history", 10000)) {
    return showError(`A history has at most ${limit("max_history", 10000)} items.`);
  }
  showError("");
  state.history.push(text);
  $("search").value = "";
  $("matches").replaceChildren();
  state.matchesFor = null;
  await describe([text]);
  renderHistory();
}

let searchTimer = null;

function onSearchInput() {
  clearTimeout(searchTimer);
  searchTimer = setTimeout(search, 200);
}

async function search() {
  const text = $("search").value.trim();
  const count = ++state.searchCount;
  const list = $("matches");
  if (!text) {
    list.replaceChildren();
    return;
  }
  if (text.split(/\s+/).length > 8) {
    list.replaceChildren(el("li", "a search takes at most 8 words", "note"));
    return; // /items would refuse it
  }
  let answer;
  try {
    answer = await call("items", { query: text.slice(0, 100), limit: 10 });
  } catch (error) {
    if (count === state.searchCount) list.replaceChildren(el("li", error.message, "note"));
    return;
  }
  if (count !== state.searchCount) return;
  state.matchesFor = text;
  list.replaceChildren();
  for (const item of answer.items) {
    state.attributes.set(item.id, item.attributes || {});
    const row = el("li");
    const pick = el("button", label(item.id), "match");
    pick.type = "button";
    pick.dataset.id = item.id;
    pick.addEventListener("click", () => addToHistory(item.id));
    row.append(pick);
    list.append(row);
  }
  if (!answer.items.length) list.append(el("li", "no item matches: Enter adds it as an id", "note"));
}

function onSearchKey(event) {
  if (event.key !== "Enter") return;
  event.preventDefault();
  const typed = $("search").value.trim();
  const first = $("matches").querySelector("button.match");
  // The best match of what is typed now; before its search has answered, the text as an id.
  addToHistory(first && state.matchesFor === typed ? first.dataset.id : typed);
}

// ------------------------------------------------------------------ the request

function readFilters() {
  const filters = {};
  for (const row of $("filters").querySelectorAll(".filter")) {
    const name = row.dataset.field;
    if (row.dataset.type === "float") {
      const condition = {};
      for (const input of row.querySelectorAll("input")) {
        if (input.value.trim() === "") continue;
        const value = Number(input.value);
        if (!Number.isFinite(value)) throw new Error(`filters: ${name} takes numbers`);
        condition[input.dataset.bound] = value;
      }
      if (Object.keys(condition).length) filters[name] = condition;
    } else {
      const values = row
        .querySelector("input")
        .value.split(",")
        .map((v) => v.trim())
        .filter((v) => v);
      if (values.length) filters[name] = values;
    }
  }
  return filters;
}

function readRequest() {
  const topk = Number($("topk").value);
  const most = limit("max_topk", 1000);
  if (!Number.isInteger(topk) || topk < 1 || topk > most) {
    throw new Error(`topk must be a whole number between 1 and ${most}`);
  }
  const body = { sequence: [...state.history], topk, exclude_seen: $("exclude-seen").checked };
  if (state.info && state.info.similar_items && $("explain").checked) body.explain = true;
  const filters = readFilters();
  if (Object.keys(filters).length) body.filters = filters;
  if (!$("user").hidden) {
    const user = $("user-id").value.trim();
    if (!user) throw new Error(`${state.info.recbole_model} needs a user_id`);
    body.user_id = user;
  }
  return body;
}

function chosenVariants() {
  if (variantNames().length < 2) return [null];
  return [...$("variants").querySelectorAll("input:checked")].map((input) => input.dataset.variant);
}

async function recommend() {
  showError("");
  let body;
  try {
    body = readRequest();
  } catch (error) {
    return showError(error.message);
  }
  const variants = chosenVariants();
  if (!variants.length) return showError("Pick at least one variant.");
  state.topk = body.topk;
  const button = $("recommend");
  button.disabled = true;
  try {
    const settled = await Promise.allSettled(
      variants.map((variant) => call("recommend", variant === null ? body : { ...body, variant }))
    );
    const ids = [];
    for (const result of settled) {
      if (result.status !== "fulfilled") continue;
      ids.push(...result.value.item_list);
      for (const reasons of result.value.because || []) ids.push(...reasons);
    }
    await describe(ids);
    const answers = $("answers");
    answers.replaceChildren();
    settled.forEach((result, i) => answers.append(renderAnswer(variants[i], result)));
  } finally {
    button.disabled = false;
  }
}

// ------------------------------------------------------------------ the answers

function renderItem(id, score, because, variant) {
  const row = el("li", null, "item");
  row.dataset.id = id;
  const pick = el("button", null, "pick");
  pick.type = "button";
  pick.title = "show the items like this one";
  pick.append(el("span", id, "id"));
  const attributes = state.attributes.get(id) || {};
  if (state.titleField && attributes[state.titleField] !== undefined) {
    pick.append(el("span", formatValue(attributes[state.titleField]), "title"));
  }
  pick.addEventListener("click", () => showSimilar(id, variant));
  row.append(pick, el("span", Number(score).toFixed(4), "score"));
  const details = el("dl", null, "attributes");
  for (const [name, value] of Object.entries(attributes)) {
    if (name === state.titleField) continue;
    details.append(el("dt", name), el("dd", formatValue(value)));
  }
  if (details.childElementCount) row.append(details);
  if (because && because.length) row.append(el("p", `because: ${because.map(label).join("; ")}`, "because"));
  return row;
}

function renderAnswer(variant, result) {
  const column = el("div", null, "answer");
  if (variant !== null) column.dataset.variant = variant;
  column.append(el("h2", variant === null ? "Recommended" : `Variant ${variant}`));
  if (result.status !== "fulfilled") {
    column.append(el("p", result.reason.message, "error"));
    return column;
  }
  const answer = result.value;
  const notes = [];
  if (typeof answer.model === "string") notes.push(`model ${answer.model}`);
  if (typeof answer.variant === "string" && variant === null) notes.push(`variant ${answer.variant}`);
  if (typeof answer.retrieval === "string") notes.push(`retrieval ${answer.retrieval}`);
  if (answer.fallback) notes.push(`${answer.fallback} fallback: no known history item to rank with`);
  if (answer.unknown_items.length) notes.push(`unknown items skipped: ${answer.unknown_items.join(", ")}`);
  if (notes.length) column.append(el("p", notes.join(" · "), "notes"));
  const list = el("ol", null, "items");
  answer.item_list.forEach((id, i) => {
    const because = answer.because ? answer.because[i] : null;
    list.append(renderItem(id, answer.score_list[i], because, variant));
  });
  if (!answer.item_list.length) column.append(el("p", "no item passes this request", "notes"));
  column.append(list);
  return column;
}

async function showSimilar(id, variant) {
  const section = $("similar");
  section.hidden = false;
  const where = variant === null ? "" : ` (variant ${variant})`;
  $("similar-title").textContent = `Items like ${label(id)}${where}`;
  const list = $("similar-list");
  list.replaceChildren();
  if (!state.info || !state.info.similar_items) {
    list.append(el("li", `${state.info ? state.info.recbole_model : "This model"} has no item table`, "note"));
    return;
  }
  const body = { items: [id], topk: state.topk };
  try {
    const answer = await call("similar_items", variant === null ? body : { ...body, variant });
    await describe(answer.item_list);
    answer.item_list.forEach((other, i) => list.append(renderItem(other, answer.score_list[i], null, variant)));
    section.dataset.for = id;
  } catch (error) {
    list.append(el("li", error.message, "error"));
  }
  section.scrollIntoView({ block: "nearest" });
}

// ------------------------------------------------------------------ start

document.addEventListener("DOMContentLoaded", () => {
  $("search").addEventListener("input", onSearchInput);
  $("search").addEventListener("keydown", onSearchKey);
  $("recommend").addEventListener("click", recommend);
  loadModel().then(() => {
    document.body.dataset.ready = "true";
  });
});
