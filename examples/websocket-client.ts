/**
 * Run-Flare WebSocket client: submit a program and follow its run live.
 *
 *   deno run --allow-net --allow-env --allow-read examples/websocket-client.ts FILE [--language ID]
 *        [--stdin TEXT | --interactive] [--url URL] [--poll] [--retries N] [--verbose]
 *
 * --interactive sends this process's stdin to the program as it runs, over the socket;
 * --poll skips the socket; --retries N sets how many consecutive failures to open the socket
 * lead to the polling fallback (default 5).
 *
 * The server address comes from --url, else env RUNFLARE_URL, else http://localhost:8787.
 * env RUNFLARE_AUTH_TOKEN, when set, is sent as X-Auth-Token (header for REST, query for the socket).
 *
 * Program output goes to stdout/stderr as it streams; progress and status go to stderr as
 * "[runflare] ..." lines. Exit code: 0 Accepted, the status id (4-14) for any other final status,
 * 1 when the client itself failed.
 *
 * The SubmissionStream class is usable on its own: typed handlers (connected, status, progress,
 * output, display, error, pong), ping, reconnection with exponential backoff that resumes with
 * `?since=SEQ` (nothing is delivered twice) and a polling fallback when the socket cannot open.
 */

// ---- Protocol types (SPEC.md "WebSocket") ---------------------------------------------------

export interface WsStatus {
  id: number;
  name: string;
  description: string;
}

export interface RunData {
  stdout?: string | null;
  stderr?: string | null;
  compile_output?: string | null;
  time?: string | null;
  wall_time?: string | null;
  memory?: number | null;
  exit_code?: number | null;
  exit_signal?: number | null;
  message?: string | null;
}

export interface DisplayOutput {
  data: Record<string, unknown>;
  metadata: Record<string, unknown>;
}

interface Envelope {
  timestamp: string;
  token: string;
  seq?: number;
}

export interface ConnectedMessage extends Envelope {
  type: "connected";
  message: string;
}

export interface StatusUpdateMessage extends Envelope {
  type: "status_update";
  status: WsStatus;
  data: RunData;
}

export interface ProgressUpdateMessage extends Envelope {
  type: "progress_update";
  stage: string;
  message?: string;
  stream?: "stdout" | "stderr";
  text?: string;
  display?: DisplayOutput;
}

export interface ErrorMessage extends Envelope {
  type: "error";
  error: string;
  details?: unknown;
}

export interface PongMessage extends Envelope {
  type: "pong";
}

export type ServerMessage =
  | ConnectedMessage
  | StatusUpdateMessage
  | ProgressUpdateMessage
  | ErrorMessage
  | PongMessage;

// ---- REST types (SPEC.md "Submissions") ----------------------------------------------------

export interface Language {
  id: number;
  name: string;
}

export interface SubmissionRequest {
  source_code: string;
  language_id?: number;
  stdin?: string | null;
  expected_output?: string | null;
  cpu_time_limit?: number;
  wall_time_limit?: number;
  memory_limit?: number;
  kernel?: string | null;
  interactive?: boolean;
}

export interface Submission extends RunData {
  token: string;
  status: { id: number; description: string };
  outputs?: DisplayOutput[];
}

/** How a followed run ended. */
export interface FinalResult {
  status: WsStatus;
  data: RunData;
  /** "websocket" when the socket delivered the final status, "polling" when REST did. */
  via: "websocket" | "polling";
  reconnects: number;
}

export interface StreamHandlers {
  onConnected?: (msg: ConnectedMessage) => void;
  onStatus?: (status: WsStatus, data: RunData, msg: StatusUpdateMessage | null) => void;
  onProgress?: (stage: string, message: string, msg: ProgressUpdateMessage) => void;
  onOutput?: (stream: "stdout" | "stderr", text: string) => void;
  onDisplay?: (display: DisplayOutput) => void;
  onError?: (error: string, details?: unknown) => void;
  onPong?: (msg: PongMessage) => void;
  /** Called before each reconnection attempt. */
  onReconnect?: (attempt: number, delayMs: number, since: number) => void;
  /** Called once when the client gives up on the socket and starts polling. */
  onFallback?: (reason: string) => void;
}

export interface StreamOptions {
  /** Consecutive failed socket attempts before falling back to polling. */
  maxRetries?: number;
  baseDelayMs?: number;
  maxDelayMs?: number;
  pollIntervalMs?: number;
  /** Send {"type": "ping"} this often while connected (0: never). */
  pingIntervalMs?: number;
  authToken?: string;
  /** Skip the socket and poll from the start. */
  forcePolling?: boolean;
}

const STATUS_NAMES: Record<number, string> = {
  1: "In Queue",
  2: "Processing",
  3: "Accepted",
  4: "Wrong Answer",
  5: "Time Limit Exceeded",
  6: "Compilation Error",
  7: "Runtime Error (SIGSEGV)",
  8: "Runtime Error (SIGXFSZ)",
  9: "Runtime Error (SIGFPE)",
  10: "Runtime Error (SIGABRT)",
  11: "Runtime Error (NZEC)",
  12: "Runtime Error (Other)",
  13: "Internal Error",
  14: "Exec Format Error",
};

/** True once a status id is final (anything after Processing). */
export function isFinal(statusId: number): boolean {
  return statusId > 2;
}

function sleep(ms: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

// ---- REST client -------------------------------------------------------------------------

/** Minimal REST client for the routes the examples need. */
export class RunFlareClient {
  readonly baseUrl: string;
  readonly authToken?: string;

  constructor(baseUrl: string, authToken?: string) {
    this.baseUrl = baseUrl.replace(/\/+$/, "");
    this.authToken = authToken;
  }

  private headers(): Record<string, string> {
    const h: Record<string, string> = { "Content-Type": "application/json" };
    if (this.authToken) h["X-Auth-Token"] = this.authToken;
    return h;
  }

  private async request<T>(method: string, path: string, body?: unknown): Promise<T> {
    const res = await fetch(this.baseUrl + "/api/v1" + path, {
      method,
      headers: this.headers(),
      body: body === undefined ? undefined : JSON.stringify(body),
    });
    const text = await res.text();
    if (!res.ok) throw new Error(`${method} ${path}: HTTP ${res.status} ${text}`);
    return JSON.parse(text) as T;
  }

  /** GET /languages: the languages this server can run. */
  languages(): Promise<Language[]> {
    return this.request<Language[]>("GET", "/languages");
  }

  /** POST /submissions: returns the new submission's token. */
  async submit(req: SubmissionRequest): Promise<string> {
    const created = await this.request<{ token: string }>("POST", "/submissions", req);
    return created.token;
  }

  /** GET /submissions/{token} with every field. */
  get(token: string): Promise<Submission> {
    return this.request<Submission>("GET", `/submissions/${encodeURIComponent(token)}?fields=*`);
  }

  /** The WebSocket URL of a submission, resuming after `since` when it is > 0. */
  wsUrl(token: string, since = 0): string {
    const url = new URL(this.baseUrl + `/api/v1/submissions/${encodeURIComponent(token)}/ws`);
    url.protocol = url.protocol === "https:" ? "wss:" : "ws:";
    if (since > 0) url.searchParams.set("since", String(since));
    if (this.authToken) url.searchParams.set("X-Auth-Token", this.authToken);
    return url.toString();
  }
}

// ---- Live stream of one submission ---------------------------------------------------------

/** Follows one submission: WebSocket with resume, polling when the socket cannot open. */
export class SubmissionStream {
  /** Highest event seq delivered to the handlers (0: none yet). */
  lastSeq = 0;
  reconnects = 0;

  private readonly client: RunFlareClient;
  private readonly token: string;
  private readonly handlers: StreamHandlers;
  private readonly opts: Required<Omit<StreamOptions, "authToken">>;
  private socket: WebSocket | null = null;
  private pendingInput: string[] = [];
  private closedByUser = false;
  private final: FinalResult | null = null;
  // Characters of each stream already delivered, so a polling fallback prints only the rest.
  private shown = { stdout: 0, stderr: 0 };
  private closeTimer: ReturnType<typeof setTimeout> | undefined;

  constructor(client: RunFlareClient, token: string, handlers: StreamHandlers = {}, opts: StreamOptions = {}) {
    this.client = client;
    this.token = token;
    this.handlers = handlers;
    this.opts = {
      maxRetries: opts.maxRetries ?? 5,
      baseDelayMs: opts.baseDelayMs ?? 250,
      maxDelayMs: opts.maxDelayMs ?? 8000,
      pollIntervalMs: opts.pollIntervalMs ?? 500,
      pingIntervalMs: opts.pingIntervalMs ?? 25000,
      forcePolling: opts.forcePolling ?? false,
    };
  }

  /** Follow the run to its final status. */
  async run(): Promise<FinalResult> {
    if (!this.opts.forcePolling) {
      let failures = 0;
      while (!this.final && !this.closedByUser) {
        const outcome = await this.connectOnce();
        if (this.final || this.closedByUser) break;
        // A socket that opened resets the count: only consecutive failures to open lead to polling.
        failures = outcome.opened ? 1 : failures + 1;
        if (!outcome.opened && failures > this.opts.maxRetries) {
          this.handlers.onFallback?.(outcome.reason);
          break;
        }
        const delay = this.backoff(failures);
        this.reconnects++;
        this.handlers.onReconnect?.(this.reconnects, delay, this.lastSeq);
        await sleep(delay);
      }
    }
    if (!this.final && !this.closedByUser) await this.poll();
    if (!this.final) throw new Error("stream closed before the run finished");
    return this.final;
  }

  /** Send {"type": "ping"}; the answer arrives at onPong. */
  ping(): void {
    if (this.socket?.readyState === WebSocket.OPEN) this.socket.send(JSON.stringify({ type: "ping" }));
  }

  /**
   * Feed the program's standard input (submissions created with `interactive: true`). Input given
   * while the socket is down is kept and sent once it is open again; `eof` closes the input.
   */
  sendStdin(data: string, eof = false): void {
    const msg: { type: "stdin"; data: string; eof?: boolean } = { type: "stdin", data };
    if (eof) msg.eof = true;
    this.pendingInput.push(JSON.stringify(msg));
    this.flushInput();
  }

  private flushInput(): void {
    while (this.pendingInput.length && this.socket?.readyState === WebSocket.OPEN) {
      this.socket.send(this.pendingInput.shift()!);
    }
  }

  /** Stop following (the run itself goes on on the server). */
  close(): void {
    this.closedByUser = true;
    this.socket?.close(1000);
  }

  private backoff(attempt: number): number {
    const exp = Math.min(this.opts.maxDelayMs, this.opts.baseDelayMs * 2 ** (attempt - 1));
    return Math.round(exp / 2 + Math.random() * (exp / 2));
  }

  /** One socket lifetime: resolves when it closes, saying whether it had opened. */
  private connectOnce(): Promise<{ opened: boolean; reason: string }> {
    return new Promise((resolve) => {
      let opened = false;
      let pinger: ReturnType<typeof setInterval> | undefined;
      let ws: WebSocket;
      try {
        ws = new WebSocket(this.client.wsUrl(this.token, this.lastSeq));
      } catch (e) {
        resolve({ opened: false, reason: String(e) });
        return;
      }
      this.socket = ws;
      ws.onopen = () => {
        opened = true;
        this.flushInput();
        if (this.opts.pingIntervalMs > 0) pinger = setInterval(() => this.ping(), this.opts.pingIntervalMs);
      };
      ws.onmessage = (ev: MessageEvent) => {
        let msg: ServerMessage;
        try {
          msg = JSON.parse(String(ev.data)) as ServerMessage;
        } catch {
          this.handlers.onError?.("bad message from server", ev.data);
          return;
        }
        this.dispatch(msg);
      };
      ws.onerror = () => {}; // the close event that follows carries what we need
      ws.onclose = (ev: CloseEvent) => {
        if (pinger !== undefined) clearInterval(pinger);
        clearTimeout(this.closeTimer);
        this.socket = null;
        resolve({ opened, reason: `socket closed (code ${ev.code}${ev.reason ? ": " + ev.reason : ""})` });
      };
    });
  }

  private dispatch(msg: ServerMessage): void {
    if (msg.type === "status_update" || msg.type === "progress_update") {
      // Events carry seq; anything at or below what we delivered is a replay we already showed.
      if (typeof msg.seq === "number") {
        if (msg.seq <= this.lastSeq) return;
        this.lastSeq = msg.seq;
      }
    }
    switch (msg.type) {
      case "connected":
        this.handlers.onConnected?.(msg);
        this.ping();
        break;
      case "status_update":
        this.handlers.onStatus?.(msg.status, msg.data ?? {}, msg);
        if (isFinal(msg.status.id)) {
          this.final = { status: msg.status, data: msg.data ?? {}, via: "websocket", reconnects: this.reconnects };
          // The server closes with 1000 after the final status; close ourselves if it does not.
          const ws = this.socket;
          this.closeTimer = setTimeout(() => ws?.close(1000), 2000);
        }
        break;
      case "progress_update":
        if (msg.stream && typeof msg.text === "string") this.deliverOutput(msg.stream, msg.text);
        else if (msg.display) this.handlers.onDisplay?.(msg.display);
        else this.handlers.onProgress?.(msg.stage, msg.message ?? "", msg);
        break;
      case "error":
        this.handlers.onError?.(msg.error, msg.details);
        break;
      case "pong":
        this.handlers.onPong?.(msg);
        break;
    }
  }

  private deliverOutput(stream: "stdout" | "stderr", text: string): void {
    this.shown[stream] += text.length;
    this.handlers.onOutput?.(stream, text);
  }

  /** Polling fallback: GET the submission until its status is final. */
  private async poll(): Promise<void> {
    let lastStatus = 0;
    while (!this.closedByUser) {
      const sub = await this.client.get(this.token);
      const id = sub.status.id;
      if (id !== lastStatus) {
        lastStatus = id;
        const status: WsStatus = { id, name: STATUS_NAMES[id] ?? String(id), description: sub.status.description };
        if (isFinal(id)) {
          for (const stream of ["stdout", "stderr"] as const) {
            const rest = (sub[stream] ?? "").slice(this.shown[stream]);
            if (rest) this.deliverOutput(stream, rest);
          }
          for (const d of sub.outputs ?? []) this.handlers.onDisplay?.(d);
          this.final = { status, data: sub, via: "polling", reconnects: this.reconnects };
        }
        this.handlers.onStatus?.(status, sub, null);
        if (this.final) return;
      }
      await sleep(this.opts.pollIntervalMs);
    }
  }
}

// ---- Command line ------------------------------------------------------------------------

const EXTENSIONS: Record<string, number> = {
  py: 71,
  js: 63,
  ts: 74,
  sh: 46,
  c: 50,
  cpp: 54,
  cc: 54,
  java: 62,
  rs: 73,
  go: 60,
  rb: 72,
  pl: 85,
  sql: 82,
};

interface CliArgs {
  file: string;
  language?: number;
  stdin?: string;
  url: string;
  poll: boolean;
  interactive: boolean;
  verbose: boolean;
  retries?: number;
}

function parseArgs(argv: string[]): CliArgs {
  const out: Partial<CliArgs> = { poll: false, verbose: false, interactive: false };
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i];
    const value = () => {
      if (i + 1 >= argv.length) throw new Error(`${a} needs a value`);
      return argv[++i];
    };
    if (a === "--language" || a === "-l") out.language = Number(value());
    else if (a === "--stdin") out.stdin = value();
    else if (a === "--url") out.url = value();
    else if (a === "--poll") out.poll = true;
    else if (a === "--interactive" || a === "-i") out.interactive = true;
    else if (a === "--retries") out.retries = Number(value());
    else if (a === "--verbose" || a === "-v") out.verbose = true;
    else if (a.startsWith("-")) throw new Error(`unknown option ${a}`);
    else out.file = a;
  }
  if (!out.file) {
    throw new Error(
      "usage: websocket-client.ts FILE [--language ID] [--stdin TEXT | --interactive] [--url URL] [--poll] [--retries N] [--verbose]",
    );
  }
  out.url = out.url ?? Deno.env.get("RUNFLARE_URL") ?? "http://localhost:8787";
  return out as CliArgs;
}

const encoder = new TextEncoder();
function write(stream: "stdout" | "stderr", text: string): void {
  (stream === "stdout" ? Deno.stdout : Deno.stderr).writeSync(encoder.encode(text));
}
function info(text: string): void {
  write("stderr", `[runflare] ${text}\n`);
}

/** Interactive runs: what this process reads on stdin goes to the program, end of input included. */
async function forwardStdin(stream: SubmissionStream): Promise<void> {
  const decoder = new TextDecoder();
  for await (const chunk of Deno.stdin.readable) {
    stream.sendStdin(decoder.decode(chunk, { stream: true }));
  }
  stream.sendStdin("", true);
}

async function main(): Promise<number> {
  let args: CliArgs;
  try {
    args = parseArgs(Deno.args);
  } catch (e) {
    info((e as Error).message);
    return 1;
  }
  const ext = args.file.split(".").pop() ?? "";
  const languageId = args.language ?? EXTENSIONS[ext];
  if (!languageId) {
    info(`cannot tell the language of ${args.file}: pass --language ID`);
    return 1;
  }
  const client = new RunFlareClient(args.url, Deno.env.get("RUNFLARE_AUTH_TOKEN") || undefined);
  const source = await Deno.readTextFile(args.file);
  const token = await client.submit({
    source_code: source,
    language_id: languageId,
    stdin: args.stdin ?? null,
    interactive: args.interactive || undefined,
  });
  info(`submitted ${token}`);

  const stream = new SubmissionStream(client, token, {
    onConnected: (m) => args.verbose && info(m.message),
    onStatus: (s) => info(`status: ${s.name || s.description}`),
    onProgress: (stage, message) => info(`stage: ${stage}${message ? ` (${message})` : ""}`),
    onOutput: (streamName, text) => write(streamName, text),
    onDisplay: (d) => {
      const plain = d.data["text/plain"];
      if (typeof plain === "string") write("stdout", plain + "\n");
      info(`display: ${Object.keys(d.data).join(", ")}`);
    },
    onError: (error) => info(`error: ${error}`),
    onPong: () => args.verbose && info("pong"),
    onReconnect: (n, delay, since) => info(`reconnecting (attempt ${n}) in ${delay} ms, since=${since}`),
    onFallback: (reason) => info(`websocket unavailable (${reason}); polling`),
  }, { forcePolling: args.poll, authToken: client.authToken, maxRetries: args.retries });

  if (args.interactive) forwardStdin(stream);
  const result = await stream.run();
  const d = result.data;
  if (d.compile_output) write("stderr", d.compile_output);
  if (d.message) info(`message: ${d.message}`);
  info(
    `final: ${result.status.id} ${result.status.name || result.status.description}` +
      ` time=${d.time ?? "-"}s memory=${d.memory ?? "-"}KB via=${result.via} reconnects=${result.reconnects}`,
  );
  return result.status.id === 3 ? 0 : result.status.id;
}

if (import.meta.main) {
  try {
    Deno.exit(await main());
  } catch (e) {
    info(`failed: ${(e as Error).message}`);
    Deno.exit(1);
  }
}
