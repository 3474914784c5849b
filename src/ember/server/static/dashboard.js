// Live dashboard: scrapes this server's /metrics (Prometheus text) every few seconds, keeps the samples of the
// last minutes and draws them with charts.js. A distributed engine labels each series per `engine`: counts
// and counters are summed over labels, the KV-cache usage fraction is averaged.
"use strict";

const params = new URLSearchParams(location.search);
const INTERVAL_MS = Number(params.get("interval_ms")) || 2000;
const WINDOW_MS = 5 * 60 * 1000;
const RATE_WINDOW_MS = 60 * 1000;  // each point's percentiles and hit rate: histogram/counter deltas over 1 min
const QUANTILES = [0.5, 0.9, 0.99];
const samples = [];

// Prometheus text format -> Map(name -> [{labels, value}]).
function parseMetrics(text) {
  const metrics = new Map();
  const lineRe = /^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)/;
  const labelRe = /([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"/g;
  for (const line of text.split("\n")) {
    if (!line || line[0] === "#") continue;
    const match = lineRe.exec(line);
    if (!match) continue;
    const labels = {};
    for (const [, key, value] of (match[2] || "").matchAll(labelRe)) labels[key] = value;
    if (!metrics.has(match[1])) metrics.set(match[1], []);
    metrics.get(match[1]).push({ labels, value: parseFloat(match[3]) });
  }
  return metrics;
}

function sum(metrics, name) {
  const rows = metrics.get(name);
  return rows ? rows.reduce((acc, row) => acc + row.value, 0) : null;
}

function mean(metrics, name) {
  const rows = metrics.get(name);
  return rows && rows.length ? sum(metrics, name) / rows.length : null;
}

// Cumulative bucket counts of one histogram, summed over labels: Map(le -> count).
function buckets(metrics, name) {
  const counts = new Map();
  for (const row of metrics.get(name + "_bucket") || []) {
    const le = row.labels.le === "+Inf" ? Infinity : parseFloat(row.labels.le);
    counts.set(le, (counts.get(le) || 0) + row.value);
  }
  return counts;
}

function toSample(metrics, t) {
  return {
    t, running: sum(metrics, "ember:num_requests_running"), waiting: sum(metrics, "ember:num_requests_waiting"),
    kvUsage: mean(metrics, "ember:kv_cache_usage_perc"),
    prefixQueries: sum(metrics, "ember:prefix_cache_queries_total") || 0,
    prefixHits: sum(metrics, "ember:prefix_cache_hits_total") || 0,
    genTokens: sum(metrics, "ember:generation_tokens_total") || 0,
    ttft: buckets(metrics, "ember:time_to_first_token_seconds"),
    tpot: buckets(metrics, "ember:time_per_output_token_seconds"),
  };
}

// A counter's growth between two samples (a restarted server starts again from 0).
function growth(older, newer) {
  return newer >= older ? newer - older : newer;
}

// Quantile of the observations between two cumulative bucket maps, interpolated inside the bucket as
// Prometheus' histogram_quantile does; null without observations.
function quantile(q, older, newer) {
  const bounds = [...newer.keys()].sort((a, b) => a - b);
  const counts = bounds.map((le) => growth(older ? older.get(le) || 0 : 0, newer.get(le)));
  const numObserved = counts[counts.length - 1];
  if (!(numObserved > 0)) return null;
  const rank = q * numObserved;
  let lower = 0, below = 0;
  for (let i = 0; i < bounds.length; i++) {
    if (counts[i] >= rank) {
      if (bounds[i] === Infinity) return lower;
      const inBucket = counts[i] - below;
      return lower + (bounds[i] - lower) * (inBucket > 0 ? (rank - below) / inBucket : 0);
    }
    lower = bounds[i];
    below = counts[i];
  }
  return lower;
}

// The sample starting the rate window that ends at samples[i].
function windowStart(i) {
  let j = i;
  while (j > 0 && samples[j - 1].t >= samples[i].t - RATE_WINDOW_MS) j--;
  return j < i ? samples[j] : null;
}

function hitRate(older, newer) {
  const numQueries = growth(older.prefixQueries, newer.prefixQueries);
  return numQueries > 0 ? growth(older.prefixHits, newer.prefixHits) / numQueries : null;
}

function series() {
  const points = (fn) => samples.map((s, i) => [s.t, fn(s, i)]);
  const tokensPerSecond = (s, i) => (i === 0 ? null : growth(samples[i - 1].genTokens, s.genTokens) * 1000 / (s.t - samples[i - 1].t));
  const percentiles = (key) => QUANTILES.map((q) => ({
    name: "p" + Math.round(q * 100),
    points: points((s, i) => {
      const start = windowStart(i), v = start && quantile(q, start[key], s[key]);
      return v === null ? null : v * 1000;
    }),
  }));
  return {
    requests: [{ name: "running", points: points((s) => s.running) }, { name: "waiting", points: points((s) => s.waiting) }],
    kv: [{ name: "used", points: points((s) => (s.kvUsage === null ? null : s.kvUsage * 100)) }],
    prefix: [{ name: "hit rate", points: points((s, i) => {
      const start = windowStart(i), rate = start && hitRate(start, s);
      return rate === null ? null : rate * 100;
    }) }],
    genTps: [{ name: "tokens/s", points: points(tokensPerSecond) }],
    ttft: percentiles("ttft"),
    tpot: percentiles("tpot"),
  };
}

function formatMs(seconds) {
  return seconds === null ? "–" : (seconds * 1000).toFixed(seconds < 0.01 ? 2 : 0) + " ms";
}

// The numbers above the charts: now for gauges and tokens/s, over the whole window for percentiles and hits.
function updateStats(data) {
  const first = samples[0], last = samples[samples.length - 1];
  const lastPoint = (s) => s.points[s.points.length - 1][1];
  document.getElementById("stat-requests").textContent = last.running + " running · " + last.waiting + " waiting";
  document.getElementById("stat-kv").textContent = last.kvUsage === null ? "–" : (last.kvUsage * 100).toFixed(1) + " %";
  const rate = samples.length > 1 ? hitRate(first, last) : null;
  document.getElementById("stat-prefix").textContent = rate === null ? "no lookups" : (rate * 100).toFixed(1) + " %";
  const tps = lastPoint(data.genTps[0]);
  document.getElementById("stat-gen-tps").textContent = tps === null ? "–" : tps.toFixed(1) + " tokens/s";
  for (const key of ["ttft", "tpot"]) {
    const older = samples.length > 1 ? first[key] : null;
    document.getElementById("stat-" + key).textContent =
      QUANTILES.map((q) => formatMs(samples.length > 1 ? quantile(q, older, last[key]) : null)).join(" / ");
  }
}

function render() {
  if (!samples.length) return;
  const data = series();
  const now = samples[samples.length - 1].t;
  const chart = (id, s, extra) => drawChart(document.getElementById(id), s, Object.assign({ windowMs: WINDOW_MS, now }, extra));
  chart("chart-requests", data.requests, {});
  chart("chart-kv", data.kv, { max: 100, unit: "%" });
  chart("chart-prefix", data.prefix, { max: 100, unit: "%" });
  chart("chart-gen-tps", data.genTps, {});
  chart("chart-ttft", data.ttft, { unit: "ms" });
  chart("chart-tpot", data.tpot, { unit: "ms" });
  updateStats(data);
}

async function scrape() {
  const status = document.getElementById("scrape-status");
  try {
    const response = await fetch("/metrics", { cache: "no-store" });
    if (!response.ok) throw new Error("HTTP " + response.status);
    const now = Date.now();
    samples.push(toSample(parseMetrics(await response.text()), now));
    while (samples.length && samples[0].t < now - WINDOW_MS) samples.shift();
    status.textContent = "updated " + new Date(now).toLocaleTimeString() + " · every " + INTERVAL_MS / 1000 + " s";
    render();
  } catch (err) {
    status.textContent = "/metrics unreachable: " + err.message;
  } finally {
    setTimeout(scrape, INTERVAL_MS);
  }
}

window.addEventListener("resize", render);
scrape();
