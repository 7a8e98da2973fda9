// A job's page: the output grows from the job's event stream (EventSource, signed in by the session
// cookie). After a drop the browser reconnects with Last-Event-ID and the server resumes after it;
// events at or before the last one shown are ignored, so no text is lost or repeated. A new attempt
// (the job was retried from the start) starts the text again. Timeline, usage and webhook
// deliveries come from the job's state (JSON), fetched when the job starts and ends, and while
// webhook deliveries are pending.
"use strict";

(function () {
  const {el, setText, setStatus, getJSON, when, seconds, orDash} = window.genq;
  const main = document.getElementById("main");
  const output = document.getElementById("output");
  const statusNode = document.getElementById("job-status");
  const streamState = document.getElementById("stream-state");
  const FINAL = ["succeeded", "failed", "canceled"];
  const WEBHOOK_POLL_MS = 3000;
  const WEBHOOK_POLLS = 40;
  let last = null;             // [attempt, seq] of the last event shown
  let webhookPolls = 0;

  function parseId(text) {
    const match = /^(\d+)-(\d+)$/.exec(text || "");
    return match ? [Number(match[1]), Number(match[2])] : null;
  }

  function isNew(id) {
    return last === null || id[0] > last[0] || (id[0] === last[0] && id[1] > last[1]);
  }

  // Takes an event if it is new (and, for a new attempt, clears the text of the previous one).
  function take(event) {
    const id = parseId(event.lastEventId);
    if (id === null || !isNew(id)) return null;
    if (last !== null && id[0] > last[0]) output.textContent = "";
    last = id;
    return JSON.parse(event.data);
  }

  function showError(error) {
    const node = document.getElementById("job-error");
    node.hidden = !error;
    node.textContent = error ? `Error (${error.type}): ${error.message}` : "";
  }

  function renderWebhooks(webhooks) {
    const body = document.getElementById("webhook-rows");
    if (!body) return false;
    const rows = [];
    for (const event of webhooks.data) {
      const deliveries = event.deliveries.length ? event.deliveries : [null];
      for (const d of deliveries) {
        rows.push(el("tr", {},
          el("td", {text: event.type}),
          el("td", {}, el("span", {class: `status status-${event.status}`, text: event.status})),
          el("td", {text: d ? d.attempt : "—"}),
          el("td", {text: d ? when(d.started_at) : "—"}),
          el("td", {text: d ? orDash(d.status_code) : "—"}),
          el("td", {text: d && d.error ? d.error : ""})));
      }
    }
    if (rows.length === 0) rows.push(el("tr", {}, el("td", {colspan: 6, text: "No webhook events yet."})));
    body.replaceChildren(...rows);
    return webhooks.data.some((event) => event.status === "pending");
  }

  function renderState(state) {
    const job = state.job;
    setStatus(statusNode, job.status);
    setText("job-attempt", job.attempts > 1 ? `(attempt ${job.attempts})` : "");
    setText("t-created", when(job.created_at));
    setText("t-started", when(job.started_at));
    const ttft = job.metrics.time_to_first_token_seconds;
    setText("t-first-token", ttft === null ? "—" : when(new Date(Date.parse(job.created_at) + ttft * 1000).toISOString()));
    setText("t-completed", when(job.completed_at));
    setText("u-prompt", orDash(job.usage.prompt_tokens));
    setText("u-cached", orDash(job.usage.cached_prompt_tokens));
    setText("u-completion", orDash(job.usage.completion_tokens));
    setText("m-queue", seconds(job.metrics.queue_seconds));
    setText("m-ttft", seconds(job.metrics.time_to_first_token_seconds));
    setText("m-generation", seconds(job.metrics.generation_seconds));
    setText("m-tps", orDash(job.metrics.tokens_per_second));
    setText("finish-reason", orDash(job.output.finish_reason));
    showError(job.error);
    const final = FINAL.includes(job.status);
    document.getElementById("cancel-form").hidden = final;
    const pending = renderWebhooks(state.webhooks);
    return final && pending;
  }

  async function refresh() {
    try {
      const pending = renderState(await getJSON(main.dataset.state));
      if (pending && webhookPolls++ < WEBHOOK_POLLS) setTimeout(refresh, WEBHOOK_POLL_MS);
    } catch (error) {
      streamState.textContent = `Could not refresh the job (${error.message}).`;
    }
  }

  function follow() {
    const stream = new EventSource(main.dataset.events);
    stream.onopen = () => { streamState.textContent = "Live: following the job's events."; };
    stream.addEventListener("status", (event) => {
      const data = take(event);
      if (data === null) return;
      setStatus(statusNode, data.status);
      refresh();
    });
    stream.addEventListener("token", (event) => {
      const data = take(event);
      if (data !== null && data.text) output.append(data.text);   // a text node: never parsed as HTML
    });
    stream.addEventListener("done", (event) => {
      const data = take(event);
      if (data === null) return;
      stream.close();
      document.getElementById("cancel-form").hidden = true;
      output.textContent = data.output.text;
      setStatus(statusNode, data.status);
      showError(data.error);
      streamState.textContent = "The job has ended.";
      refresh();
    });
    stream.addEventListener("error", (event) => {
      if (event.data) {
        const data = JSON.parse(event.data);
        if (data.type === "stream_interrupted") {   // the server's stream lost Redis (no id): it resumes
          streamState.textContent = "The server's stream was interrupted; resuming…";
        } else if (take(event) !== null) {          // the job's own error event
          showError(data);
        }
      } else if (stream.readyState === EventSource.CONNECTING) {
        streamState.textContent = "Connection lost; resuming where it stopped…";
      } else if (stream.readyState === EventSource.CLOSED) {
        streamState.textContent = "The event stream closed; reload the page to follow the job.";
      }
    });
  }

  if (main.dataset.final === "true") {
    const pending = document.getElementById("webhook-rows");
    if (pending && pending.dataset.pending === "true") setTimeout(refresh, WEBHOOK_POLL_MS);
  } else {
    follow();
  }
})();
