// Shared helpers of the console's pages. Everything a job carries is untrusted: it only ever
// reaches the page through textContent / text nodes, never as HTML.
"use strict";

window.genq = (function () {
  function pad(n) { return String(n).padStart(2, "0"); }

  // The time format the server's templates use: "2026-01-31 12:00:00 UTC".
  function when(iso) {
    if (!iso) return "—";
    const d = new Date(iso);
    if (Number.isNaN(d.getTime())) return "—";
    return `${d.getUTCFullYear()}-${pad(d.getUTCMonth() + 1)}-${pad(d.getUTCDate())} ` +
           `${pad(d.getUTCHours())}:${pad(d.getUTCMinutes())}:${pad(d.getUTCSeconds())} UTC`;
  }

  function seconds(value) {
    return value === null || value === undefined ? "—" : `${Number(value).toFixed(3)} s`;
  }

  function orDash(value) {
    return value === null || value === undefined ? "—" : String(value);
  }

  // An element with text content and attributes; children are nodes or strings (as text).
  function el(tag, attributes, ...children) {
    const node = document.createElement(tag);
    for (const [name, value] of Object.entries(attributes || {})) {
      if (value === null || value === undefined || value === false) continue;
      if (name === "text") node.textContent = String(value);
      else node.setAttribute(name, value === true ? "" : String(value));
    }
    node.append(...children);
    return node;
  }

  function setText(id, value) {
    const node = document.getElementById(id);
    if (node) node.textContent = value;
  }

  // The status badge: the status as text, its class for the colour.
  function setStatus(node, status) {
    node.textContent = status;
    node.className = `status status-${status}`;
  }

  async function getJSON(url) {
    const response = await fetch(url, {credentials: "same-origin", headers: {Accept: "application/json"}});
    if (!response.ok) throw new Error(`${url}: HTTP ${response.status}`);
    return response.json();
  }

  return {when, seconds, orDash, el, setText, setStatus, getJSON};
})();
