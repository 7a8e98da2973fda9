// The overview: polls /ui/overview.json every few seconds and redraws the queue, the caller's job
// counts, latency, the workers and a throughput chart (rates from the differences between polls).
"use strict";

(function () {
  const {el, setText, getJSON} = window.genq;
  const source = document.getElementById("main").dataset.source;
  const POLL_MS = 2000;
  const WINDOW_S = 300;
  const samples = [];          // {t, tokensPerSecond, jobsPerSecond}
  let previous = null;         // the last poll: {t, tokens: {worker id: generation_tokens}, finished}

  function fmt(value, digits) {
    return value === null || value === undefined ? "—" : Number(value).toFixed(digits);
  }

  function renderQueue(queue) {
    const rows = [];
    for (const [lane, byPriority] of Object.entries(queue.waiting)) {
      const entries = Object.entries(byPriority);
      if (entries.length === 0) rows.push(el("tr", {}, el("td", {text: lane}), el("td", {text: "—"}), el("td", {text: "0"})));
      for (const [priority, count] of entries) {
        rows.push(el("tr", {}, el("td", {text: lane}), el("td", {text: priority}), el("td", {text: count})));
      }
    }
    document.getElementById("queue-rows").replaceChildren(...rows);
    setText("broker-tasks", String(queue.broker_tasks));
  }

  function renderCounts(counts) {
    const items = [];
    for (const [status, count] of Object.entries(counts)) {
      items.push(el("div", {}, el("dt", {}, el("span", {class: `status status-${status}`, text: status})),
                    el("dd", {text: count})));
    }
    document.getElementById("job-counts").replaceChildren(...items);
  }

  function renderLatency(latency) {
    setText("latency-caption", `Over the ${latency.jobs} most recent finished jobs (all keys)`);
    for (const kind of ["ttft", "tpot"]) {
      for (const point of ["p50", "p90", "p99"]) {
        const value = latency[kind][point];
        const text = value === null ? "—" : value < 1 ? `${(value * 1000).toFixed(0)} ms` : `${value.toFixed(2)} s`;
        setText(`${kind}-${point}`, text);
      }
    }
  }

  // A labelled bar; `warn`: past 70% / 90% of max it shows as a warning (a KV cache filling up).
  function meter(id, label, value, max, warn) {
    const known = typeof value === "number" && typeof max === "number" && max > 0;
    const levels = known && warn ? {low: max * 0.7, high: max * 0.9, optimum: 0} : {};
    return el("div", {class: "meter"},
      el("label", {for: id, text: label}),
      el("meter", {id, min: 0, max: known ? max : 1, value: known ? value : 0, ...levels}));
  }

  function renderWorkers(workers, now) {
    const cards = workers.map((w, i) => {
      const kvPercent = w.kv_blocks_total ? Math.round(100 * w.kv_blocks_used / w.kv_blocks_total) : null;
      const health = w.healthy === false ? "unhealthy" : "live";
      return el("li", {class: "card worker", "data-worker-id": w.id},
        el("h3", {class: "mono", text: w.id}),
        el("p", {}, "Status: ", el("span", {class: `status status-${health}`, text: health}),
           ` · reported ${fmt(Math.max(0, now - w.reported_at), 1)} s ago`),
        el("dl", {class: "facts"},
          el("div", {class: "full"}, el("dt", {text: "Model"}), el("dd", {class: "worker-model", text: w.model ?? "—"})),
          el("div", {class: "full"}, el("dt", {text: "Device"}), el("dd", {text: w.device ?? "not reported"})),
          el("div", {}, el("dt", {text: "Largest batch"}), el("dd", {text: w.max_batch_size ?? "—"})),
          el("div", {}, el("dt", {text: "Jobs in flight"}), el("dd", {text: w.jobs_in_flight ?? "—"})),
          el("div", {}, el("dt", {text: "Waiting requests"}), el("dd", {text: w.waiting ?? "—"})),
          el("div", {}, el("dt", {text: "Preemptions"}), el("dd", {text: w.preemptions ?? "—"}))),
        meter(`running-${i}`, `Running requests: ${w.running ?? "—"} of ${w.max_num_seqs ?? "—"}`,
              w.running, w.max_num_seqs, false),
        meter(`kv-${i}`, `KV cache: ${w.kv_blocks_used ?? "—"} of ${w.kv_blocks_total ?? "—"} blocks` +
              (kvPercent === null ? "" : ` (${kvPercent}%)`), w.kv_blocks_used, w.kv_blocks_total, true));
    });
    document.getElementById("workers").replaceChildren(...cards);
    document.getElementById("workers-empty").hidden = workers.length > 0;
  }

  function addSample(data) {
    const tokens = Object.fromEntries(data.workers.map((w) => [w.id, w.generation_tokens || 0]));
    const current = {t: data.time, tokens, finished: data.jobs.finished_all_keys};
    if (previous !== null && current.t > previous.t) {
      const dt = current.t - previous.t;
      let newTokens = 0;
      for (const [id, count] of Object.entries(tokens)) {
        if (id in previous.tokens) newTokens += Math.max(0, count - previous.tokens[id]);
      }
      samples.push({t: current.t, tokensPerSecond: newTokens / dt,
                    jobsPerSecond: Math.max(0, current.finished - previous.finished) / dt});
      while (samples.length && samples[0].t < current.t - WINDOW_S) samples.shift();
      const last = samples[samples.length - 1];
      setText("tokens-rate", fmt(last.tokensPerSecond, 1));
      setText("jobs-rate", fmt(last.jobsPerSecond, 2));
    }
    previous = current;
  }

  function drawChart() {
    const canvas = document.getElementById("throughput-chart");
    const ratio = window.devicePixelRatio || 1;
    const width = canvas.clientWidth || 720;
    const height = canvas.clientHeight || 180;
    canvas.width = Math.round(width * ratio);
    canvas.height = Math.round(height * ratio);
    const ctx = canvas.getContext("2d");
    ctx.scale(ratio, ratio);
    ctx.clearRect(0, 0, width, height);
    const style = getComputedStyle(canvas);
    const pad = {left: 44, right: 44, top: 10, bottom: 20};
    const plotW = width - pad.left - pad.right;
    const plotH = height - pad.top - pad.bottom;
    const end = samples.length ? samples[samples.length - 1].t : Date.now() / 1000;
    // the x axis: the time since the first sample, at least a minute, at most WINDOW_S
    const span = Math.min(WINDOW_S, Math.max(60, samples.length ? end - samples[0].t : 0));
    const maxTokens = Math.max(1, ...samples.map((s) => s.tokensPerSecond));
    const maxJobs = Math.max(0.1, ...samples.map((s) => s.jobsPerSecond));
    ctx.font = "11px system-ui, sans-serif";
    ctx.fillStyle = style.color;
    ctx.strokeStyle = style.getPropertyValue("--grid").trim() || "#ccc";
    ctx.lineWidth = 1;
    ctx.strokeRect(pad.left, pad.top, plotW, plotH);
    ctx.textAlign = "right";
    ctx.fillText(maxTokens.toFixed(0), pad.left - 4, pad.top + 10);
    ctx.fillText("0", pad.left - 4, pad.top + plotH);
    ctx.textAlign = "left";
    ctx.fillText(maxJobs.toFixed(2), width - pad.right + 4, pad.top + 10);
    ctx.fillText("0", width - pad.right + 4, pad.top + plotH);
    ctx.textAlign = "center";
    ctx.fillText(`−${Math.round(span / 60)} min`, pad.left, height - 4);
    ctx.fillText("now", pad.left + plotW, height - 4);
    const series = [["tokensPerSecond", maxTokens, style.getPropertyValue("--tokens") || "#1d4ed8", []],
                    ["jobsPerSecond", maxJobs, style.getPropertyValue("--jobs") || "#b45309", [6, 4]]];
    for (const [field, max, colour, dash] of series) {
      ctx.beginPath();
      ctx.setLineDash(dash);
      ctx.strokeStyle = colour.trim();
      ctx.lineWidth = 2;
      samples.forEach((s, i) => {
        const x = pad.left + plotW * (1 - (end - s.t) / span);
        const y = pad.top + plotH * (1 - s[field] / max);
        if (i === 0) ctx.moveTo(x, y); else ctx.lineTo(x, y);
      });
      ctx.stroke();
    }
    ctx.setLineDash([]);
  }

  async function poll() {
    try {
      const data = await getJSON(source);
      renderQueue(data.queue);
      renderCounts(data.jobs.yours);
      renderLatency(data.latency);
      renderWorkers(data.workers, data.time);
      addSample(data);
      drawChart();
      setText("overview-state", `Updated ${window.genq.when(new Date(data.time * 1000).toISOString())}`);
    } catch (error) {
      setText("overview-state", `Could not update (${error.message}); retrying.`);
    }
    setTimeout(poll, POLL_MS);
  }

  poll();
})();
