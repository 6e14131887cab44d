/* Run-Flare embed: live code cells for any page. Plain JS, no build step, no framework.
 *
 *   <script src="https://RUNFLARE-SERVER/embed.js" defer></script>
 *   <pre data-runflare="python">print("hello")</pre>
 *
 * Every element with data-runflare (a <pre>, a <textarea>, or a <script type="text/plain">) becomes an
 * editable cell with a Run button. Status, stages and output stream in over the submission's WebSocket
 * (resumed with ?since=SEQ after a dropped socket, else polled); time, memory and exit code at the end.
 * Attributes and the JS API (window.RunFlare): docs/embed.md. Protocol: docs/api.md.
 */
(function () {
  "use strict";
  if (window.RunFlare && window.RunFlare.version) return;   // loaded twice: keep the first

  const SCRIPT = document.currentScript;
  const SCRIPT_ORIGIN = (() => {
    try { return SCRIPT && SCRIPT.src ? new URL(SCRIPT.src, location.href).origin : location.origin; }
    catch (e) { return location.origin; }
  })();

  // Judge0 language ids by the names authors write; a number is taken as an id.
  const LANGUAGES = {
    python: 71, python3: 71, py: 71, c: 50, "c++": 54, cpp: 54, java: 62, javascript: 63, js: 63,
    typescript: 74, ts: 74, rust: 73, go: 60, ruby: 72, perl: 85, bash: 46, sh: 46, sql: 82,
  };
  const LABELS = { 71: "Python", 50: "C", 54: "C++", 62: "Java", 63: "JavaScript", 74: "TypeScript", 73: "Rust",
    60: "Go", 72: "Ruby", 85: "Perl", 46: "Bash", 82: "SQL" };
  const STATUS_NAMES = { 1: "In Queue", 2: "Processing", 3: "Accepted", 4: "Wrong Answer", 5: "Time Limit Exceeded",
    6: "Compilation Error", 7: "Runtime Error (SIGSEGV)", 8: "Runtime Error (SIGXFSZ)", 9: "Runtime Error (SIGFPE)",
    10: "Runtime Error (SIGABRT)", 11: "Runtime Error (NZEC)", 12: "Runtime Error (Other)", 13: "Internal Error",
    14: "Exec Format Error" };
  // Limits a cell may set as data-<name with dashes> (Judge0's fields; the server enforces its maxima).
  const LIMITS = ["cpu_time_limit", "cpu_extra_time", "wall_time_limit", "memory_limit", "stack_limit",
    "max_processes_and_or_threads", "max_file_size", "number_of_runs"];
  const INDENT = "    ";

  const defaults = {
    server: (SCRIPT && SCRIPT.dataset.server) || SCRIPT_ORIGIN,
    token: (SCRIPT && SCRIPT.dataset.token) || "",
    editor: (SCRIPT && SCRIPT.dataset.editor) || "codemirror",   // "textarea": no CodeMirror
  };

  // The editor: CodeMirror 6, one prebuilt file next to this one (runflare-editor.js), loaded once for every
  // cell. Until it has loaded, or if it cannot be, a cell edits in a plain textarea (Tab indents).
  let editorLoad = null;
  function loadEditor() {
    if (window.RunFlareEditor && window.RunFlareEditor.create) return Promise.resolve(window.RunFlareEditor);
    if (!editorLoad) {
      editorLoad = new Promise((resolve) => {
        const script = document.createElement("script");
        script.src = SCRIPT_ORIGIN + "/runflare-editor.js";
        script.onload = () => resolve(window.RunFlareEditor && window.RunFlareEditor.create ? window.RunFlareEditor : null);
        script.onerror = () => resolve(null);
        (document.head || document.documentElement).append(script);
      });
    }
    return editorLoad;
  }

  // ---- styles (one sheet, every rule under .rf-cell) -------------------------------------
  const CSS = `
.rf-cell{--rf-ink:#1d2330;--rf-muted:#667085;--rf-line:#d9dde3;--rf-accent:#e4572e;--rf-ok:#1a7f37;--rf-warn:#b7791f;
 --rf-bad:#c62828;--rf-run:#1f6feb;--rf-mono:ui-monospace,SFMono-Regular,Menlo,Consolas,"Liberation Mono",monospace;
 border:1px solid var(--rf-line);border-radius:8px;background:#fff;color:var(--rf-ink);margin:1em 0;padding:.6em;
 font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;display:flex;flex-direction:column;gap:.5em}
.rf-cell *{box-sizing:border-box}
.rf-bar{display:flex;align-items:center;gap:.6em;flex-wrap:wrap}
.rf-lang{font-size:.8em;font-weight:600;text-transform:uppercase;letter-spacing:.05em;color:var(--rf-muted)}
.rf-run{font:inherit;font-weight:600;cursor:pointer;padding:.25em 1.1em;border-radius:5px;border:1px solid var(--rf-accent);
 background:var(--rf-accent);color:#fff}
.rf-run:disabled{opacity:.55;cursor:default}
.rf-run:focus-visible,.rf-code:focus-visible,.rf-cell input:focus-visible,.rf-cell button:focus-visible{outline:3px solid var(--rf-run);outline-offset:1px}
.rf-hint{font-size:.8em;color:var(--rf-muted);margin-left:auto}
.rf-status{display:inline-block;padding:.1em .65em;border-radius:999px;font-size:.85em;font-weight:600;background:#e8eaee;color:var(--rf-muted)}
.rf-status[data-kind=queued]{background:#eef2ff;color:#4338ca}.rf-status[data-kind=processing]{background:#e7f0ff;color:var(--rf-run)}
.rf-status[data-kind=accepted]{background:#e6f4ea;color:var(--rf-ok)}.rf-status[data-kind=wrong]{background:#fff6e0;color:var(--rf-warn)}
.rf-status[data-kind=error]{background:#fdecea;color:var(--rf-bad)}
.rf-code{font:13.5px/1.5 var(--rf-mono);width:100%;min-height:4.5em;border:1px solid var(--rf-line);border-radius:5px;
 padding:.5em;resize:vertical;tab-size:4;white-space:pre;overflow:auto;background:#fbfbfc;color:var(--rf-ink)}
.rf-code[readonly]{background:#f3f4f6}
.rf-editor .cm-editor{background:#fbfbfc}.rf-editor[data-readonly=true] .cm-editor{background:#f3f4f6}
.rf-stages{list-style:none;padding:0;margin:0;display:flex;gap:.3em;flex-wrap:wrap}
.rf-stages:empty{display:none}
.rf-stages li{font-size:.78em;padding:.05em .45em;border-radius:4px;background:#f0f2f5;color:var(--rf-muted)}
.rf-stages li:last-child{background:#e7f0ff;color:var(--rf-run)}
.rf-output{font:13px/1.45 var(--rf-mono);background:#0f1420;color:#e6e9ef;border-radius:6px;padding:.5em .6em;margin:0;
 max-height:22em;overflow:auto;white-space:pre-wrap;word-break:break-word}
.rf-output:empty{display:none}
.rf-output .rf-stderr{color:#ff9b8a}.rf-output .rf-note{color:#8b93a7;font-style:italic}.rf-output .rf-stdin{color:#9bd37b}
.rf-input{display:none;gap:.4em;align-items:center}.rf-input.rf-on{display:flex}
.rf-input input{flex:1;font:13px var(--rf-mono);padding:.25em .4em;border:1px solid var(--rf-line);border-radius:5px}
.rf-cell button.rf-plain{font:inherit;font-size:.85em;cursor:pointer;padding:.2em .6em;border-radius:5px;border:1px solid var(--rf-line);background:#fff}
.rf-displays:empty{display:none}
.rf-displays>*{display:block;max-width:100%;border:1px solid var(--rf-line);border-radius:5px;margin-bottom:.4em}
.rf-displays iframe{width:100%;min-height:8em;background:#fff}
.rf-displays pre{font:13px var(--rf-mono);padding:.4em;margin:0 0 .4em;white-space:pre-wrap}
.rf-tests:empty{display:none}
.rf-tests table{border-collapse:collapse;width:100%;font-size:.9em}
.rf-tests th,.rf-tests td{text-align:left;padding:.25em .5em;border-bottom:1px solid var(--rf-line);vertical-align:top}
.rf-tests td.rf-verdict[data-kind=accepted]{color:var(--rf-ok);font-weight:600}
.rf-tests td.rf-verdict[data-kind=wrong],.rf-tests td.rf-verdict[data-kind=error]{color:var(--rf-bad);font-weight:600}
.rf-tests pre{font:12.5px/1.4 var(--rf-mono);margin:.2em 0 0;white-space:pre-wrap}
.rf-diff .rf-del{background:#fdecea;color:var(--rf-bad)}.rf-diff .rf-add{background:#e6f4ea;color:var(--rf-ok)}
.rf-summary{font-weight:600;margin:.3em 0 0}
.rf-summary[data-all=true]{color:var(--rf-ok)}.rf-summary[data-all=false]{color:var(--rf-bad)}
.rf-extra{font:12.5px var(--rf-mono);white-space:pre-wrap;color:var(--rf-bad);margin:0}.rf-extra:empty{display:none}
.rf-stats{display:flex;gap:.2em 1em;flex-wrap:wrap;font-size:.82em;margin:0;color:var(--rf-muted)}
.rf-stats[hidden]{display:none}
.rf-stats div{display:flex;gap:.35em}.rf-stats dt{margin:0}.rf-stats dd{margin:0;font-family:var(--rf-mono);color:var(--rf-ink)}
.rf-sr{position:absolute;width:1px;height:1px;overflow:hidden;clip:rect(0 0 0 0);white-space:nowrap}
`;
  function injectStyles() {
    if (document.getElementById("runflare-embed-style")) return;
    const style = document.createElement("style");
    style.id = "runflare-embed-style";
    style.textContent = CSS;
    (document.head || document.documentElement).append(style);
  }

  // ---- helpers -------------------------------------------------------------------------------
  let counter = 0;
  function el(tag, props, ...children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(props || {})) {
      if (v == null || v === false) continue;
      if (k === "text") node.textContent = v;
      else if (k === "class") node.className = v;
      else if (k.includes("-") || ["role", "for", "spellcheck", "autocapitalize", "autocomplete"].includes(k)) {
        node.setAttribute(k, v === true ? "" : String(v));
      }
      else node[k] = v;
    }
    node.append(...children.filter((c) => c != null));
    return node;
  }
  function dedent(text) {
    const lines = text.replace(/\r\n?/g, "\n").replace(/^\n+/, "").replace(/\s+$/, "").split("\n");
    let common = null;
    for (const line of lines) {
      if (!line.trim()) continue;
      const lead = line.match(/^[ \t]*/)[0];
      if (common === null || !lead.startsWith(common)) {
        let i = 0;
        while (common !== null && i < common.length && i < lead.length && common[i] === lead[i]) i++;
        common = common === null ? lead : common.slice(0, i);
      }
    }
    return lines.map((l) => l.slice(common ? Math.min(common.length, l.match(/^[ \t]*/)[0].length) : 0)).join("\n") + "\n";
  }
  function truthy(value) {
    return value != null && value !== "false" && value !== "no" && value !== "0";
  }
  function statusKind(id) {
    return id === 1 ? "queued" : id === 2 ? "processing" : id === 3 ? "accepted" : id === 4 ? "wrong" : id > 2 ? "error" : "idle";
  }
  // The server's comparison: trailing whitespace stripped on each line and at the end.
  function normalize(text) {
    return (text || "").replace(/\r\n?/g, "\n").split("\n").map((l) => l.replace(/\s+$/, "")).join("\n").replace(/\s+$/, "");
  }
  // A line diff (longest common subsequence): [[" ", line] | ["-", expected only] | ["+", got only]].
  function lineDiff(expected, got) {
    const a = normalize(expected).split("\n"), b = normalize(got).split("\n");
    const n = a.length, m = b.length;
    if (n * m > 250000) return [...a.map((l) => ["-", l]), ...b.map((l) => ["+", l])];
    const L = Array.from({ length: n + 1 }, () => new Uint32Array(m + 1));
    for (let i = n - 1; i >= 0; i--) for (let j = m - 1; j >= 0; j--) {
      L[i][j] = a[i] === b[j] ? L[i + 1][j + 1] + 1 : Math.max(L[i + 1][j], L[i][j + 1]);
    }
    const out = [];
    let i = 0, j = 0;
    while (i < n && j < m) {
      if (a[i] === b[j]) { out.push([" ", a[i]]); i++; j++; }
      else if (L[i + 1][j] >= L[i][j + 1]) out.push(["-", a[i++]]);
      else out.push(["+", b[j++]]);
    }
    while (i < n) out.push(["-", a[i++]]);
    while (j < m) out.push(["+", b[j++]]);
    return out;
  }
  function readJson(value, what) {
    if (!value) return null;
    let text = value.trim();
    if (text.startsWith("#")) {
      const source = document.querySelector(text);
      if (!source) throw new Error(`${what}: no element ${text}`);
      text = source.textContent;
    }
    return JSON.parse(text);
  }

  // ---- the client for one server -------------------------------------------------------------
  class Client {
    constructor(server, token) {
      this.server = String(server || defaults.server).replace(/\/+$/, "");
      this.token = token || "";
    }
    async api(method, path, body) {
      let res;
      try {
        res = await fetch(this.server + "/api/v1" + path, {
          method, mode: "cors", credentials: "omit",
          headers: { ...(body === undefined ? {} : { "Content-Type": "application/json" }),
            ...(this.token ? { "X-Auth-Token": this.token } : {}) },
          body: body === undefined ? undefined : JSON.stringify(body),
        });
      } catch (e) {
        const err = new Error(`cannot reach the Run-Flare server at ${this.server}: the server is down, or it does not `
          + `allow this page's origin (${location.origin}) in its CORS settings (cors_origins)`);
        err.network = true;
        throw err;
      }
      const text = await res.text();
      let data = null;
      try { data = text ? JSON.parse(text) : null; } catch (e) { data = text; }
      if (!res.ok) {
        const detail = res.status === 401 ? "missing or wrong token (data-token)"
          : typeof data === "string" ? data : data && data.error ? data.error : JSON.stringify(data);
        const err = new Error(`HTTP ${res.status}: ${detail}`);
        err.status = res.status; err.body = data;
        throw err;
      }
      return data;
    }
    wsUrl(token, since) {
      const u = new URL(this.server + `/api/v1/submissions/${encodeURIComponent(token)}/ws`, location.href);
      u.protocol = u.protocol === "https:" ? "wss:" : "ws:";
      if (since > 0) u.searchParams.set("since", String(since));
      if (this.token) u.searchParams.set("X-Auth-Token", this.token);
      return u.toString();
    }
  }

  // ---- following one submission: WebSocket with resume, polling fallback ---------------------
  // handlers: status(id, name), stage(stage, message), stream(name, text), display(d), note(text), final(data)
  class Follower {
    constructor(client, token, handlers) {
      this.client = client; this.token = token; this.h = handlers;
      this.lastSeq = 0; this.final = false; this.stopped = false; this.failures = 0;
      this.shown = { stdout: 0, stderr: 0 }; this.displays = 0; this.ws = null; this.pending = [];
    }
    start() {
      if (this.stopped || this.final) return;
      let opened = false;
      let ws;
      try { ws = new WebSocket(this.client.wsUrl(this.token, this.lastSeq)); } catch (e) { this.poll(); return; }
      this.ws = ws;
      ws.onopen = () => { opened = true; this.failures = 0; this.flush(); };
      ws.onmessage = (ev) => {
        try { this.handle(JSON.parse(ev.data)); } catch (e) { this.h.note(`bad message: ${e.message}`); }
      };
      ws.onclose = (ev) => {
        if (this.stopped || this.final) return;
        this.failures = opened ? 1 : this.failures + 1;
        if (!opened && this.failures >= 3) { this.h.note("WebSocket unavailable; polling"); this.poll(); return; }
        const delay = Math.min(8000, 250 * 2 ** (this.failures - 1));
        this.h.note(`connection closed (${ev.code}); reconnecting in ${delay} ms from event ${this.lastSeq}`);
        setTimeout(() => this.start(), delay);
      };
    }
    stop() {
      this.stopped = true;
      if (this.ws && this.ws.readyState <= 1) this.ws.close(1000);
    }
    sendStdin(data, eof) {
      const msg = { type: "stdin", data };
      if (eof) msg.eof = true;
      this.pending.push(JSON.stringify(msg));
      this.flush();
    }
    flush() {
      while (this.pending.length && this.ws && this.ws.readyState === WebSocket.OPEN) this.ws.send(this.pending.shift());
    }
    handle(msg) {
      if ((msg.type === "status_update" || msg.type === "progress_update") && typeof msg.seq === "number") {
        if (msg.seq <= this.lastSeq) return;   // a replay of something already handled
        this.lastSeq = msg.seq;
      }
      if (msg.type === "status_update") {
        this.h.status(msg.status.id, msg.status.name || STATUS_NAMES[msg.status.id] || msg.status.description);
        if (msg.status.id > 2) this.finish(msg.data || {});
      } else if (msg.type === "progress_update") {
        if (msg.stream && typeof msg.text === "string") {
          this.shown[msg.stream] = (this.shown[msg.stream] || 0) + msg.text.length;
          this.h.stream(msg.stream, msg.text);
        } else if (msg.display) { this.displays++; this.h.display(msg.display); }
        else if (msg.stage) this.h.stage(msg.stage, msg.message);
      } else if (msg.type === "error") {
        this.h.note(`error: ${msg.error}${msg.details ? " " + JSON.stringify(msg.details) : ""}`);
      }
    }
    finish(data) {
      if (this.final) return;
      this.final = true;
      const ws = this.ws;
      if (ws && ws.readyState === WebSocket.OPEN) setTimeout(() => ws.readyState === WebSocket.OPEN && ws.close(1000), 2000);
      this.h.final(data);
    }
    async poll() {
      let last = 0;
      while (!this.stopped && !this.final) {
        try {
          const sub = await this.client.api("GET", `/submissions/${encodeURIComponent(this.token)}?fields=*,outputs`);
          const id = sub.status.id;
          if (id !== last) {
            last = id;
            if (id > 2) {
              for (const s of ["stdout", "stderr"]) {
                const rest = (sub[s] || "").slice(this.shown[s]);
                if (rest) this.h.stream(s, rest);
              }
              for (const d of (sub.outputs || []).slice(this.displays)) this.h.display(d);
            }
            this.h.status(id, STATUS_NAMES[id] || sub.status.description);
            if (id > 2) { this.finish(sub); return; }
          }
        } catch (e) { this.h.note(`polling failed: ${e.message}`); }
        await new Promise((r) => setTimeout(r, 500));
      }
    }
  }

  // ---- one cell --------------------------------------------------------------------------------
  const B64 = /^[A-Za-z0-9+/=\s]+$/;

  class Cell {
    constructor(source, options) {
      const d = source.dataset;
      const o = options || {};
      this.source = source;
      this.id = ++counter;
      const lang = String(o.language ?? d.runflare ?? "python").trim().toLowerCase();
      this.languageId = /^[0-9]+$/.test(lang) ? Number(lang) : LANGUAGES[lang];
      if (!this.languageId) throw new Error(`Run-Flare: unknown language "${lang}" (use a Judge0 id, e.g. data-runflare="71")`);
      const kernel = o.kernel ?? (d.kernel !== undefined ? (d.kernel || true) : false);
      this.kernelSpec = typeof kernel === "string" && truthy(kernel) && kernel !== "true" ? kernel : null;
      this.kernel = kernel === true || kernel === "true" || !!this.kernelSpec;
      if (this.kernel && !this.kernelSpec && this.languageId < 1000) this.languageId += 1000;   // 71 → 1071
      this.stdin = o.stdin ?? d.stdin ?? null;
      this.args = o.args ?? d.args ?? null;
      this.expected = o.expected ?? d.expected ?? null;
      this.readOnly = o.readOnly ?? truthy(d.readonly ?? d.readOnly ?? null);
      this.editorKind = o.editor ?? d.editor ?? defaults.editor;
      this.interactive = o.interactive ?? truthy(d.interactive ?? null);
      this.limits = {};
      for (const name of LIMITS) {
        const attr = d[name.replace(/_([a-z])/g, (_, c) => c.toUpperCase())];
        const value = o.limits && o.limits[name] != null ? o.limits[name] : attr;
        if (value != null && value !== "") this.limits[name] = Number(value);
      }
      this.client = new Client(o.server ?? d.server ?? defaults.server, o.token ?? d.token ?? defaults.token);
      this.tests = (o.tests ?? readJson(d.tests, "data-tests") ?? []).map((t, i) => ({
        name: t.name || `Test ${i + 1}`, input: t.input ?? t.stdin ?? "", expected: t.expected ?? t.expected_output ?? "",
        hidden: !!t.hidden, args: t.args ?? null,
      }));
      this.label = o.label ?? d.label ?? ((LABELS[this.languageId % 1000] || `language ${this.languageId}`) + (this.kernel ? " (kernel)" : ""));
      const code = o.code ?? (source.tagName === "TEXTAREA" ? source.value : source.textContent);
      this.followers = [];
      this.build(dedent(code || ""));
      this.running = false;
      this.editor = null;
      if (this.editorKind !== "textarea") loadEditor().then((E) => { if (E) this.upgrade(E); });
    }

    // The code: CodeMirror's document once it is there, else the textarea's.
    getCode() { return this.editor ? this.editor.getCode() : this.code.value; }
    setCode(text) { if (this.editor) this.editor.setCode(text); else this.code.value = text; }
    upgrade(E) {
      if (this.editor) return;
      const hadFocus = document.activeElement === this.code;
      const box = el("div", { class: "rf-editor", "data-readonly": String(!!this.readOnly) });
      this.code.before(box);
      this.editor = E.create(box, {
        doc: this.code.value, language: this.languageId, readOnly: this.readOnly, onRun: () => this.run(),
        attributes: { "aria-label": this.code.getAttribute("aria-label"),
          "aria-describedby": this.code.getAttribute("aria-describedby") },
      });
      this.code.hidden = true;
      this.root.dataset.editor = "codemirror";
      if (hadFocus) this.editor.focus();
    }

    build(code) {
      const uid = `rf-${this.id}`;
      this.root = el("div", { class: "rf-cell", role: "group", "aria-label": `${this.label} code cell`,
        "data-language-id": String(this.languageId), "data-state": "idle", "data-editor": "textarea" });
      if (this.source.id) { this.root.id = this.source.id; }
      this.runButton = el("button", { type: "button", class: "rf-run", text: this.tests.length ? "Run tests" : "Run",
        title: "Run (Ctrl+Enter)", "aria-describedby": `${uid}-status` });
      this.statusBadge = el("span", { class: "rf-status", id: `${uid}-status`, role: "status", "data-kind": "idle",
        "data-status-id": "0", "data-final": "false", text: "Idle" });
      this.code = el("textarea", { class: "rf-code", spellcheck: "false", autocapitalize: "off", autocomplete: "off",
        "aria-label": `${this.label} code`, "aria-describedby": `${uid}-keys`, readOnly: this.readOnly });
      this.code.value = code;
      this.code.rows = Math.min(30, Math.max(3, code.split("\n").length));
      const keys = el("span", { class: "rf-sr", id: `${uid}-keys`,
        text: "Ctrl+Enter runs. Tab indents; press Escape, then Tab, to leave the editor." });
      this.stages = el("ol", { class: "rf-stages", "aria-label": "Stages" });
      this.output = el("pre", { class: "rf-output", "aria-live": "polite", "aria-label": "Output", tabIndex: 0 });
      this.inputLine = el("input", { type: "text", spellcheck: "false", autocomplete: "off", "aria-label": "Program input",
        placeholder: "a line for the program; Enter sends it" });
      this.eofButton = el("button", { type: "button", class: "rf-plain", text: "End input" });
      this.inputRow = el("div", { class: "rf-input" }, this.inputLine, this.eofButton);
      this.displays = el("div", { class: "rf-displays", "aria-label": "Rich output" });
      this.extra = el("pre", { class: "rf-extra" });
      this.testsBox = el("div", { class: "rf-tests", "aria-live": "polite" });
      this.stat = {};
      const statItems = [["time", "time"], ["memory", "memory"], ["exit", "exit code"]].map(([k, label]) => {
        this.stat[k] = el("dd", { class: `rf-stat-${k}`, text: "–" });
        return el("div", {}, el("dt", { text: label }), this.stat[k]);
      });
      this.stats = el("dl", { class: "rf-stats", hidden: true }, ...statItems);
      const bar = el("div", { class: "rf-bar" }, el("span", { class: "rf-lang", text: this.label }), this.runButton,
        this.statusBadge, el("span", { class: "rf-hint", "aria-hidden": "true", text: "Ctrl+Enter runs" }));
      this.root.append(bar, this.code, keys, this.stages, this.output, this.inputRow, this.displays, this.extra,
        this.testsBox, this.stats);
      this.root.runflare = this;

      this.runButton.addEventListener("click", () => this.run());
      this.root.addEventListener("keydown", (e) => {
        if (e.key === "Enter" && (e.ctrlKey || e.metaKey) && !e.defaultPrevented) { e.preventDefault(); this.run(); }
      });
      let escaped = false;
      this.code.addEventListener("keydown", (e) => {
        if (e.key === "Escape") { escaped = true; return; }
        const wasEscaped = escaped;
        escaped = false;
        if (e.key !== "Tab" || wasEscaped || this.code.readOnly || e.ctrlKey || e.altKey || e.metaKey) return;
        e.preventDefault();
        this.indent(e.shiftKey);
      });
      this.inputLine.addEventListener("keydown", (e) => {
        if (e.key !== "Enter" || e.ctrlKey || e.metaKey || !this.follower || this.follower.final) return;
        e.preventDefault();
        const line = this.inputLine.value + "\n";
        this.inputLine.value = "";
        this.append("stdin", line);   // echoed as a terminal would
        this.follower.sendStdin(line, false);
      });
      this.eofButton.addEventListener("click", () => {
        if (this.follower && !this.follower.final) { this.follower.sendStdin("", true); this.inputRow.classList.remove("rf-on"); }
      });
    }

    indent(outdent) {
      const t = this.code, start = t.selectionStart, end = t.selectionEnd, v = t.value;
      const lineStart = v.lastIndexOf("\n", start - 1) + 1;
      if (!outdent && start === end) { t.setRangeText(INDENT, start, end, "end"); return; }
      const blockEnd = end > start && v[end - 1] === "\n" ? end - 1 : end;
      const lines = v.slice(lineStart, blockEnd).split("\n");
      const changed = lines.map((l) => outdent ? l.replace(new RegExp(`^( {1,${INDENT.length}}|\\t)`), "") : INDENT + l).join("\n");
      t.setRangeText(changed, lineStart, blockEnd, "preserve");
      t.selectionStart = lineStart; t.selectionEnd = lineStart + changed.length;
    }

    // -- rendering
    setStatus(id, label) {
      const b = this.statusBadge;
      b.textContent = label || STATUS_NAMES[id] || `status ${id}`;
      b.dataset.statusId = String(id);
      b.dataset.final = String(id > 2);
      b.dataset.kind = statusKind(id);
      this.emit("status", { id, label: b.textContent });
    }
    addStage(stage, message) {
      this.stages.append(el("li", { "data-stage": stage, text: message && message !== stage ? `${stage}: ${message}` : stage }));
    }
    append(stream, text) {
      const out = this.output;
      const atBottom = out.scrollTop + out.clientHeight >= out.scrollHeight - 4;
      const last = out.lastElementChild;
      if (last && last.dataset.stream === stream) last.append(text);   // text nodes: never parsed as HTML
      else out.append(el("span", { "data-stream": stream, class: stream === "stdout" ? null : `rf-${stream}`, text }));
      if (atBottom) out.scrollTop = out.scrollHeight;
      if (stream === "stdout" || stream === "stderr") this.emit("output", { stream, text });
    }
    note(text) { this.append("note", `[${text}]\n`); }
    addDisplay(display) {
      const data = (display && display.data) || {};
      const box = this.displays;
      for (const mime of ["image/png", "image/jpeg", "image/gif"]) {
        if (typeof data[mime] === "string" && B64.test(data[mime])) {
          const alt = typeof data["text/plain"] === "string" ? data["text/plain"] : mime;
          box.append(el("img", { alt, src: `data:${mime};base64,${data[mime].replace(/\s/g, "")}` }));
          return;
        }
      }
      if (typeof data["image/svg+xml"] === "string") {   // as an <img>: scripts inside never run
        box.append(el("img", { alt: "image/svg+xml", src: "data:image/svg+xml;charset=utf-8," + encodeURIComponent(data["image/svg+xml"]) }));
        return;
      }
      if (typeof data["text/html"] === "string") {
        // A sandboxed frame with no permissions: no scripts, no forms, no access to this page.
        const frame = el("iframe", { title: "HTML output", referrerPolicy: "no-referrer" });
        frame.setAttribute("sandbox", "");
        frame.srcdoc = data["text/html"];
        box.append(frame);
        return;
      }
      box.append(el("pre", { text: typeof data["text/plain"] === "string" ? data["text/plain"] : JSON.stringify(data) }));
    }
    showResult(data) {
      this.stats.hidden = false;
      this.stat.time.textContent = data.time != null ? `${data.time} s` : "–";
      this.stat.memory.textContent = data.memory != null ? `${data.memory} KB` : "–";
      this.stat.exit.textContent = data.exit_signal != null ? `signal ${data.exit_signal}`
        : data.exit_code != null ? String(data.exit_code) : "–";
      this.extra.textContent = [data.compile_output, data.message].filter(Boolean).join("\n");
    }
    reset() {
      for (const f of this.followers) f.stop();
      this.followers = []; this.follower = null;
      for (const box of [this.output, this.displays, this.stages, this.testsBox]) box.replaceChildren();
      this.extra.textContent = "";
      this.stats.hidden = true;
      for (const dd of Object.values(this.stat)) dd.textContent = "–";
      this.inputRow.classList.remove("rf-on");
    }
    emit(name, detail) {
      this.root.dispatchEvent(new CustomEvent(`runflare:${name}`, { bubbles: true, detail: { cell: this, ...detail } }));
    }
    setRunning(running) {
      this.running = running;
      this.runButton.disabled = running;
      this.root.dataset.state = running ? "running" : "done";
      this.root.setAttribute("aria-busy", String(running));
    }

    // -- running
    body(extra) {
      const body = { source_code: this.getCode(), ...this.limits };
      if (this.kernelSpec) body.kernel = this.kernelSpec; else body.language_id = this.languageId;
      if (this.args) body.command_line_arguments = this.args;
      return Object.assign(body, extra);
    }
    async run() {
      if (this.running) return;
      this.reset();
      this.setRunning(true);
      this.setStatus(1, "Submitting…");
      this.statusBadge.dataset.final = "false";
      try {
        if (this.tests.length) await this.runTests(); else await this.runOnce();
      } catch (e) {
        this.fail(e);
      }
    }
    fail(e) {
      this.setStatus(0, e.network ? "Refused" : "Not submitted");
      this.statusBadge.dataset.kind = "error";
      this.statusBadge.dataset.final = "true";
      this.root.dataset.error = e.network ? "network" : String(e.status || "error");
      this.note(e.message);
      this.setRunning(false);
      this.emit("done", { error: e.message });
    }
    async runOnce() {
      const extra = { stdin: this.interactive ? null : this.stdin };
      if (this.interactive) extra.interactive = true;
      if (this.expected != null) extra.expected_output = this.expected;
      const { token } = await this.client.api("POST", "/submissions", this.body(extra));
      this.root.dataset.token = token;
      this.follower = new Follower(this.client, token, {
        status: (id, name) => this.setStatus(id, name),
        stage: (stage, message) => this.addStage(stage, message),
        stream: (stream, text) => this.append(stream, text),
        display: (d) => this.addDisplay(d),
        note: (text) => this.note(text),
        final: (data) => {
          this.inputRow.classList.remove("rf-on");
          this.showResult(data);
          this.setRunning(false);
          this.emit("done", { data, status: Number(this.statusBadge.dataset.statusId) });
        },
      });
      this.followers = [this.follower];
      this.follower.start();
      if (this.interactive) { this.inputRow.classList.add("rf-on"); this.inputLine.focus(); }
    }
    async runTests() {
      const tests = this.tests;
      const answers = await this.client.api("POST", "/submissions/batch", {
        submissions: tests.map((t) => this.body({ stdin: t.input, expected_output: t.expected,
          ...(t.args != null ? { command_line_arguments: t.args } : {}) })),
      });
      const table = el("table", {}, el("caption", { class: "rf-sr", text: "Test results" }),
        el("thead", {}, el("tr", {}, ...["Test", "Verdict", "Time", "Memory", "Details"].map((h) => el("th", { scope: "col", text: h })))));
      const tbody = el("tbody");
      table.append(tbody);
      const summary = el("p", { class: "rf-summary", role: "status", text: `0/${tests.length} passed, ${tests.length} running` });
      this.testsBox.append(table, summary);
      const results = new Array(tests.length).fill(null);
      const done = () => {
        const finished = results.filter(Boolean);
        const passed = finished.filter((r) => r.id === 3).length;
        const running = tests.length - finished.length;
        summary.textContent = `${passed}/${tests.length} passed` + (running ? `, ${running} running` : "");
        if (running) return;
        summary.dataset.all = String(passed === tests.length);
        this.setStatus(passed === tests.length ? 3 : 4, `${passed}/${tests.length} passed`);
        this.statusBadge.dataset.kind = passed === tests.length ? "accepted" : "wrong";
        const first = results.find((r) => r.id !== 3) || results[0];
        this.showResult(first.data);
        this.setRunning(false);
        this.emit("done", { passed, total: tests.length, results });
      };
      this.setStatus(2, "Running tests");
      tests.forEach((t, i) => {
        const verdict = el("td", { class: "rf-verdict", "data-kind": "queued", text: "In Queue" });
        const time = el("td", { class: "rf-time", text: "–" }), memory = el("td", { class: "rf-memory", text: "–" });
        const details = el("td", { class: "rf-details" });
        if (!t.hidden) details.append(el("div", { class: "rf-case-input", text: t.input ? `input: ${t.input.replace(/\n$/, "").replace(/\n/g, " ⏎ ")}` : "no input" }));
        else details.append(el("div", { text: "hidden test" }));
        const row = el("tr", { class: "rf-case", "data-case": String(i), "data-hidden": String(t.hidden), "data-final": "false" },
          el("th", { scope: "row", text: t.name }), verdict, time, memory, details);
        tbody.append(row);
        const answer = answers[i] || {};
        if (!answer.token) {
          results[i] = { id: 13, data: {} };
          verdict.textContent = "Not submitted"; verdict.dataset.kind = "error"; row.dataset.final = "true";
          details.append(el("pre", { text: JSON.stringify(answer) }));
          return;
        }
        row.dataset.token = answer.token;
        let stdout = "";
        const follower = new Follower(this.client, answer.token, {
          status: (id, name) => { verdict.textContent = name; verdict.dataset.kind = statusKind(id); verdict.dataset.statusId = String(id); },
          stage: () => {},
          stream: (stream, text) => { if (stream === "stdout") stdout += text; },
          display: () => {},
          note: () => {},
          final: (data) => {
            const id = Number(verdict.dataset.statusId);
            const out = data.stdout != null ? data.stdout : stdout;
            time.textContent = data.time != null ? `${data.time} s` : "–";
            memory.textContent = data.memory != null ? `${data.memory} KB` : "–";
            row.dataset.final = "true";
            if (id === 4 && !t.hidden) {
              const diff = el("pre", { class: "rf-diff", "aria-label": "Difference: minus lines expected, plus lines printed" });
              for (const [mark, line] of lineDiff(t.expected, out)) {
                diff.append(el("span", { class: mark === "-" ? "rf-del" : mark === "+" ? "rf-add" : null, text: `${mark} ${line}\n` }));
              }
              details.append(el("div", { text: "expected (-) vs. printed (+):" }), diff);
            } else if (id > 4 || id === 0) {
              const why = [data.compile_output, data.stderr, data.message].filter(Boolean).join("\n");
              if (why && !t.hidden) details.append(el("pre", { class: "rf-error", text: why }));
            }
            results[i] = { id, data: { ...data, stdout: out } };
            done();
          },
        });
        this.followers.push(follower);
        follower.start();
      });
    }
  }

  // ---- the API ---------------------------------------------------------------------------------
  const cells = [];
  function cell(target, options) {
    const source = typeof target === "string" ? document.querySelector(target) : target;
    if (!source) throw new Error(`Run-Flare: no element ${target}`);
    if (source.runflare) return source.runflare;
    injectStyles();
    const c = new Cell(source, options);
    source.runflare = c;
    source.replaceWith(c.root);
    cells.push(c);
    return c;
  }
  function init(root) {
    const found = [];
    for (const source of (root || document).querySelectorAll("[data-runflare]")) {
      if (source.runflare || source.classList.contains("rf-cell")) continue;
      try { found.push(cell(source)); } catch (e) { console.error(e); }
    }
    return found;
  }
  function configure(options) {
    if (options.server) defaults.server = String(options.server);
    if (options.token !== undefined) defaults.token = options.token || "";
    return { ...defaults };
  }
  function get(target) {
    const node = typeof target === "string" ? document.querySelector(target) : target;
    return node ? node.runflare || null : null;
  }

  window.RunFlare = { version: "1", cell, init, configure, get, cells, runAll: () => Promise.all(cells.map((c) => c.run())) };
  const manual = SCRIPT && SCRIPT.dataset.manual !== undefined;
  if (!manual) {
    if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", () => init());
    else init();
  }
})();
