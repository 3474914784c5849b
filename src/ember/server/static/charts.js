// Small line charts on a plain <canvas> (no chart library): time on x over a fixed window, gaps where a
// value is null, a legend and four y grid lines.
"use strict";

const CHART_COLORS = ["#3559e0", "#e07a35", "#2f9e6e", "#a23fd1"];

function niceMax(value) {
  if (!(value > 0)) return 1;
  const step = Math.pow(10, Math.floor(Math.log10(value)));
  for (const m of [1, 2, 2.5, 5, 10]) if (m * step >= value) return m * step;
  return 10 * step;
}

function formatTick(value) {
  if (value === 0) return "0";
  if (Math.abs(value) >= 1000) return (value / 1000).toFixed(value >= 10000 ? 0 : 1) + "k";
  return Number(value.toPrecision(3)).toString();
}

// series: [{name, points: [[t_ms, value|null], ...]}]; options: {windowMs, now, max (fixed y max), unit}
function drawChart(canvas, series, options) {
  const ratio = window.devicePixelRatio || 1;
  const width = canvas.clientWidth, height = canvas.clientHeight;
  if (canvas.width !== width * ratio || canvas.height !== height * ratio) {
    canvas.width = width * ratio;
    canvas.height = height * ratio;
  }
  const ctx = canvas.getContext("2d");
  ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
  ctx.clearRect(0, 0, width, height);
  const left = 44, right = 8, top = 18, bottom = 18;
  const plotW = width - left - right, plotH = height - top - bottom;
  let peak = 0;
  for (const s of series) for (const [, v] of s.points) if (v !== null && v > peak) peak = v;
  const yMax = options.max || niceMax(peak);
  const x = (t) => left + plotW * (1 - (options.now - t) / options.windowMs);
  const y = (v) => top + plotH * (1 - Math.min(v, yMax) / yMax);

  ctx.font = "11px system-ui, sans-serif";
  ctx.strokeStyle = "#e4e8ef";
  ctx.fillStyle = "#667085";
  ctx.lineWidth = 1;
  for (let i = 0; i <= 4; i++) {
    const value = (yMax * i) / 4, py = Math.round(y(value)) + 0.5;
    ctx.beginPath(); ctx.moveTo(left, py); ctx.lineTo(left + plotW, py); ctx.stroke();
    ctx.textAlign = "right"; ctx.textBaseline = "middle";
    ctx.fillText(formatTick(value) + (options.unit || ""), left - 4, py);
  }
  ctx.textAlign = "center"; ctx.textBaseline = "top";
  const minutes = options.windowMs / 60000;
  for (let m = 0; m <= minutes; m++) {
    ctx.textAlign = m === 0 ? "right" : "center";  // "now" sits at the right edge
    ctx.fillText(m === 0 ? "now" : "-" + m + "m", x(options.now - m * 60000), top + plotH + 4);
  }

  series.forEach((s, i) => {
    const color = CHART_COLORS[i % CHART_COLORS.length];
    ctx.strokeStyle = color; ctx.lineWidth = 1.6;
    ctx.beginPath();
    let isDrawing = false;
    for (const [t, v] of s.points) {
      if (v === null || t < options.now - options.windowMs) { isDrawing = false; continue; }
      if (isDrawing) ctx.lineTo(x(t), y(v)); else ctx.moveTo(x(t), y(v));
      isDrawing = true;
    }
    ctx.stroke();
    ctx.fillStyle = color; ctx.textAlign = "left"; ctx.textBaseline = "top";
    ctx.fillText("● " + s.name, left + 4 + i * 90, 2);
  });
}
