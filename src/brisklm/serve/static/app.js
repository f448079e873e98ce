// brisklm streaming demo: send source words at a chosen rate over /ws, show target words as they are written.
"use strict";
const $ = (id) => document.getElementById(id);
let ws = null, timer = null, sent = [], latencies = [], examples = [], exampleAt = 0;
// a server started with --token: open the page as http://HOST:PORT/#token=TOKEN (the hash never leaves the browser)
const token = new URLSearchParams(location.hash.slice(1)).get("token");

function setStatus(text, isError) {
  $("status").textContent = text;
  $("status").className = isError ? "error" : "";
}

function addWord(box, text, cls, sub) {
  const span = document.createElement("span");
  span.className = "word " + cls;
  span.textContent = text;
  if (sub !== undefined) {
    const s = document.createElement("sub");
    s.textContent = sub;
    span.appendChild(s);
  }
  box.appendChild(span);
  return span;
}

function markRead(n) {  // shade the source words the engine had read when it wrote
  const spans = $("source-stream").children;
  for (let i = 0; i < spans.length && i < n; i++) spans[i].classList.add("read");
}

function median(xs) {
  const s = [...xs].sort((a, b) => a - b), m = Math.floor(s.length / 2);
  return s.length % 2 ? s[m] : (s[m - 1] + s[m]) / 2;
}

function onFrame(frame) {
  if (frame.type === "word" || frame.type === "reason") {
    const text = frame.type === "word" ? frame.word : frame.text;
    const span = addWord($("target-stream"), text, frame.type === "word" ? "out fresh" : "reason fresh", frame.delay);
    span.title = `written after ${frame.delay} source words, ${frame.latency_ms} ms after its input arrived`;
    setTimeout(() => span.classList.remove("fresh"), 600);
    markRead(frame.delay);
    latencies.push(frame.latency_ms);
    $("tgt-count").textContent = `(${$("target-stream").children.length} words)`;
    $("f-delay").textContent = frame.delay;
    $("f-lat").textContent = `${median(latencies).toFixed(1)} / ${Math.max(...latencies).toFixed(1)}`;
  } else if (frame.type === "done") {
    $("f-al").textContent = frame.AL !== undefined ? frame.AL.toFixed(2) : "–";
    $("f-time").textContent = `${frame.server_ms.toFixed(0)} / ${frame.engine_ms.toFixed(0)}`;
    markRead(frame.source_words);
    setStatus(`done: ${frame.words.length} words from ${frame.source_words} source words${frame.truncated ? " (truncated)" : ""}`);
    finish();
  } else if (frame.type === "error") {
    setStatus(`error (${frame.code}): ${frame.message} — stream stopped`, true);
    finish();  // the demo stops at the first error; the server would keep a non-fatal session open
  } else if (frame.type === "ready") {
    setStatus(`session ${frame.session} open: ${frame.policy} ${JSON.stringify(frame.options)}`);
  }
}

function finish() {
  clearInterval(timer);
  timer = null;
  if (ws) { ws.onclose = null; ws.close(); ws = null; }
  $("start").disabled = false;
  $("stop").disabled = true;
}

function start() {
  const words = $("source").value.trim().split(/\s+/).filter(Boolean);
  if (!words.length) { setStatus("type some source words first", true); return; }
  $("source-stream").innerHTML = ""; $("target-stream").innerHTML = "";
  ["f-delay", "f-lat", "f-al", "f-time"].forEach((id) => { $(id).textContent = "–"; });
  $("src-count").textContent = ""; $("tgt-count").textContent = "";
  sent = []; latencies = [];
  const proto = location.protocol === "https:" ? "wss" : "ws";
  const query = token ? `?access_token=${encodeURIComponent(token)}` : "";
  ws = new WebSocket(`${proto}://${location.host}/ws${query}`);
  $("start").disabled = true; $("stop").disabled = false;
  ws.onmessage = (event) => onFrame(JSON.parse(event.data));
  ws.onerror = () => setStatus("connection error", true);
  ws.onclose = () => { setStatus("connection closed", true); finish(); };
  ws.onopen = () => {
    ws.send(JSON.stringify({ type: "start", options: { k: Number($("k").value) } }));
    let i = 0;
    const tick = () => {
      if (!ws || ws.readyState !== WebSocket.OPEN) return;
      if (i < words.length) {
        ws.send(JSON.stringify({ type: "words", words: [words[i]] }));
        addWord($("source-stream"), words[i], "sent");
        $("src-count").textContent = `(${i + 1} of ${words.length} words)`;
        i += 1;
      } else {
        ws.send(JSON.stringify({ type: "end" }));
        clearInterval(timer); timer = null;
      }
    };
    timer = setInterval(tick, 1000 / Number($("rate").value));
    tick();
  };
}

async function init() {
  $("rate").oninput = () => { $("rate-out").textContent = $("rate").value; };
  $("start").onclick = start;
  $("stop").onclick = () => { setStatus("stopped"); finish(); };
  $("example").onclick = () => {
    if (examples.length) { $("source").value = examples[exampleAt % examples.length]; exampleAt += 1; }
  };
  try {
    const config = await (await fetch("/api/config", token ? {headers: {Authorization: `Bearer ${token}`}} : {})).json();
    examples = config.examples || [];
    if (config.options && config.options.k) $("k").value = config.options.k;
    $("server-info").textContent = `model ${config.model} · policy ${config.policy} · up to ${config.limits.max_sessions} sessions`;
    if (examples.length && !$("source").value) $("source").value = examples[0];
    exampleAt = 1;
  } catch (e) {
    $("server-info").textContent = "server unreachable";
  }
}
init();
