// ChatSocket: one WebSocket to /ws that reconnects with backoff and full jitter,
// resumes every joined room from the last id and epoch it saw, and drops duplicates.
// It never gives up while signed in; it stops for good only on 1008, 1000 (signed out),
// a failed refresh, or stop().

const CLOSE = Object.freeze({
  NORMAL: 1000, GOING_AWAY: 1001, ABNORMAL: 1006, POLICY: 1008, TOO_LARGE: 1009,
  INTERNAL: 1011, TRY_AGAIN: 1013, TOKEN_EXPIRED: 4001,
});

const LOBBY = "lobby";

/** The ref a join carries, so a refusal of it is told from a refused publish. */
const joinRef = (room) => `join:${room}`;

/** Parse a stream id "<ms>-<seq>" into [ms, seq]; ids compare as two integers. */
export function parseId(id) {
  const m = /^(\d+)-(\d+)$/.exec(String(id));
  return m ? [Number(m[1]), Number(m[2])] : null;
}

/** True when stream id a is strictly after b (b may be null). */
export function idAfter(a, b) {
  const pa = parseId(a);
  if (!pa) return false;
  const pb = b == null ? null : parseId(b);
  if (!pb) return true;
  return pa[0] > pb[0] || (pa[0] === pb[0] && pa[1] > pb[1]);
}

/** Full jitter: random(0, min(cap, base * 2^attempt)). */
export function fullJitter(attempt, base, cap) {
  return Math.random() * Math.min(cap, base * 2 ** attempt);
}

/**
 * Events (all CustomEvent, payload in `detail`):
 *   status   {state: "connecting"|"connected"|"reconnecting"|"offline"|"signed-out",
 *             retryAt?: ms epoch, instance?: "host:pid", lastClose?: close code, reason?}
 *   welcome  the welcome frame
 *   message  a room message, new to this client (deduplicated by id per room)
 *   reset    {room}: history has a gap; drop the room's view before the messages that follow
 *   joined / left / presence / members / ack / error / direct: the server frame as is
 *
 * checkSession() resolves to "ok", "signed-out", "error" or "offline" (GET /auth/me);
 * refresh() resolves to "ok", "refused" or "unavailable" (POST /auth/refresh).
 */
export class ChatSocket extends EventTarget {
  constructor({ checkSession, refresh, url = defaultUrl(), base = 1000, cap = 30000,
                tryAgainBase = 5000, stableAfter = 10000 } = {}) {
    super();
    this.url = url;
    this.checkSession = checkSession;
    this.refresh = refresh;
    this.base = base;
    this.cap = cap;
    this.tryAgainBase = tryAgainBase;
    this.stableAfter = stableAfter;

    this.ws = null;            // the only socket; null while waiting to reconnect
    this.running = false;      // true between start() and stop()/terminal close
    this.attempt = 0;          // backoff exponent; reset once a connection proved stable
    this.refreshed = false;    // one refresh per 4001 until a connection proves stable
    this.mustRefresh = false;  // a 4001 wants a new access token before the next connect
    this.retryTimer = null;
    this.stableTimer = null;
    this.instance = null;
    this.lastClose = null;     // code of the last close, for the status line and tests
    this.state = "signed-out";
    this.refCounter = 0;
    // room -> {lastId, epoch, buffer}; buffer holds a resume's replay until `recovered`.
    this.rooms = new Map([[LOBBY, newRoom()]]);

    this.onOnline = () => this.reconnectNow();
    this.onOffline = () => { if (!this.ws) this.setState("offline", { retryAt: this.retryAt }); };
  }

  // ---- public API -------------------------------------------------------------------

  /** Connect (after sign-in); keeps reconnecting until stop() or a terminal close. */
  start() {
    if (this.running) return;
    this.running = true;
    this.attempt = 0;
    this.refreshed = this.mustRefresh = false;
    window.addEventListener("online", this.onOnline);
    window.addEventListener("offline", this.onOffline);
    this.connect();
  }

  /** Close for good (sign-out) and forget every room. */
  stop(state = "signed-out", reason = "") {
    this.running = false;
    window.removeEventListener("online", this.onOnline);
    window.removeEventListener("offline", this.onOffline);
    this.clearTimers();
    const ws = this.ws;
    this.ws = null;
    if (ws) ws.close(CLOSE.NORMAL, "client stop");
    this.rooms = new Map([[LOBBY, newRoom()]]);
    this.instance = null;
    this.setState(state, { reason });
  }

  /** Reconnect at once if waiting for a retry (browser back online, user asked). */
  reconnectNow() {
    if (!this.running || this.ws || !this.retryTimer) return;
    this.clearTimers();
    this.resume();
  }

  get connected() { return this.state === "connected"; }

  /** The rooms this client is in, in join order. */
  roomNames() { return [...this.rooms.keys()]; }

  join(room) {
    if (!this.rooms.has(room)) this.rooms.set(room, newRoom());
    return this.send({ type: "join", room, ref: joinRef(room) });
  }

  leave(room) {
    if (room === LOBBY) return false;
    this.rooms.delete(room);
    return this.send({ type: "leave", room });
  }

  members(room) { return this.send({ type: "members", room }); }

  /** Publish to a room; returns the ref that comes back in `ack` or `error`, or null. */
  publish(room, message) {
    const ref = `c${++this.refCounter}`;
    return this.send({ type: "publish", room, message, ref }) ? ref : null;
  }

  send(frame) {
    if (!this.ws || this.ws.readyState !== WebSocket.OPEN || !this.connected) return false;
    this.ws.send(JSON.stringify(frame));
    return true;
  }

  // ---- connection lifecycle -----------------------------------------------------------

  connect() {
    if (!this.running || this.ws) return;     // never two sockets at once
    const lobby = this.rooms.get(LOBBY);
    const url = new URL(this.url);
    if (lobby.lastId && lobby.epoch) {
      url.searchParams.set("since", lobby.lastId);
      url.searchParams.set("epoch", lobby.epoch);
      lobby.buffer = [];
    }
    this.setState("connecting");
    const ws = new WebSocket(url);
    this.ws = ws;
    let opened = false;
    ws.onopen = () => {
      opened = true;
      this.stableTimer = setTimeout(() => { this.attempt = 0; this.refreshed = false; },
                                    this.stableAfter);
    };
    ws.onmessage = (ev) => { if (this.ws === ws) this.onFrame(ev.data); };
    ws.onclose = (ev) => { if (this.ws === ws) this.onClose(ev, opened); };
  }

  async onClose(ev, opened) {
    this.ws = null;
    this.instance = null;
    this.clearTimers();
    for (const state of this.rooms.values()) state.buffer = null;
    const { code, reason } = ev;
    this.lastClose = code;

    // 1008 is terminal whatever its reason: "revoked" (a token signed out, e.g. a copied
    // cookie), "missing token", "invalid token: ...", flooding.
    if (code === CLOSE.POLICY) return this.stop("signed-out", reason || "access refused");
    // The server sends 1000 only for a sign-out: terminal, like 1008 (decided by code,
    // never by the reason's wording).
    if (code === CLOSE.NORMAL) return this.stop("signed-out", reason);
    if (code === CLOSE.TOKEN_EXPIRED) {
      if (this.refreshed) return this.stop("signed-out", "session expired");
      this.refreshed = true;
      this.mustRefresh = true;
      return this.resume();
    }
    if (!opened) {
      // Refused before the upgrade: signed out (401) or the network/server is down?
      const session = await this.checkSession().catch(() => "offline");
      if (!this.running || this.ws) return;
      if (session === "signed-out") return this.stop("signed-out", "session ended");
      return this.scheduleRetry(session === "offline" ? "offline" : "reconnecting");
    }
    // 1001, 1006, 1011, anything unexpected: still signed in, so try again. 1013 asks
    // us to back off harder.
    this.scheduleRetry("reconnecting", code === CLOSE.TRY_AGAIN);
  }

  /** Reconnect now, refreshing the access token first when a 4001 asked for it. */
  async resume() {
    if (!this.mustRefresh) return this.connect();
    this.setState("reconnecting");
    const result = await this.refresh();
    if (!this.running || this.ws) return undefined;
    if (result === "refused") return this.stop("signed-out", "session expired");
    if (result !== "ok") return this.scheduleRetry("reconnecting");   // try the refresh again
    this.mustRefresh = false;
    return this.connect();
  }

  scheduleRetry(state, tryAgainLater = false) {
    if (!navigator.onLine) state = "offline";
    const base = tryAgainLater ? this.tryAgainBase : this.base;
    const floor = tryAgainLater ? base : 0;
    const delay = Math.min(this.cap, floor + fullJitter(this.attempt, base, this.cap));
    this.attempt += 1;
    this.retryAt = Date.now() + delay;
    this.retryTimer = setTimeout(() => { this.retryTimer = null; this.resume(); }, delay);
    this.setState(state, { retryAt: this.retryAt });
  }

  clearTimers() {
    clearTimeout(this.retryTimer);
    clearTimeout(this.stableTimer);
    this.retryTimer = this.stableTimer = null;
    this.retryAt = undefined;
  }

  setState(state, extra = {}) {
    this.state = state;
    this.emit("status", { state, instance: this.instance, lastClose: this.lastClose, ...extra });
  }

  emit(type, detail) { this.dispatchEvent(new CustomEvent(type, { detail })); }

  // ---- frames -------------------------------------------------------------------------

  onFrame(data) {
    let frame;
    try { frame = JSON.parse(data); } catch { return; }
    const state = frame.room != null ? this.rooms.get(frame.room) : undefined;
    switch (frame.type) {
      case "welcome": return this.onWelcome(frame);
      case "message":
        if (!state) return;                                  // a room we already left
        if (state.buffer) state.buffer.push(frame);
        else this.deliver(frame, state);
        return;
      case "joined":
        if (state) this.onJoined(frame, state);
        return this.emit("joined", frame);
      case "recovered":
        if (state) this.onRecovered(frame, state);
        return this.emit("joined", frame);
      case "left":
        if (frame.reason) this.rooms.delete(frame.room);     // revoked: never rejoin it
        return this.emit("left", frame);
      case "error":
        if (frame.code === "forbidden" && frame.ref === joinRef(frame.room)) {
          this.rooms.delete(frame.room);                     // refused: never retry it
          return this.emit("refused", frame);
        }
        return this.emit("error", frame);
      case "presence": case "members": case "ack": case "direct":
        return this.emit(frame.type, frame);
      default:
        return undefined;                                    // newer server, unknown frame
    }
  }

  onWelcome(frame) {
    this.instance = frame.instance ?? null;
    this.setState("connected");
    this.emit("welcome", frame);
    const joinedByServer = new Set(frame.rooms ?? []);
    for (const [room, state] of this.rooms) {
      if (joinedByServer.has(room)) continue;
      const join = { type: "join", room, ref: joinRef(room) };
      if (state.lastId && state.epoch) {
        Object.assign(join, { since: state.lastId, epoch: state.epoch });
        state.buffer = [];
      }
      this.send(join);
    }
  }

  onJoined(frame, state) {
    // A plain join (no resume): keep what we have, but a new epoch means a new history.
    if (state.lastId && frame.epoch && frame.epoch !== state.epoch) {
      state.lastId = null;
      this.emit("reset", { room: frame.room });
    }
    state.epoch = frame.epoch ?? state.epoch;
    const pending = state.buffer ?? [];
    state.buffer = null;
    for (const msg of pending) this.deliver(msg, state);
  }

  onRecovered(frame, state) {
    const replay = state.buffer ?? [];
    state.buffer = null;
    state.epoch = frame.epoch ?? state.epoch;
    if (frame.complete === false) {
      // History no longer reaches our last id (or Redis was reset): start the view over.
      state.lastId = null;
      this.emit("reset", { room: frame.room });
    }
    for (const msg of replay) this.deliver(msg, state);
  }

  deliver(frame, state) {
    if (!idAfter(frame.id, state.lastId)) return;            // seen already
    state.lastId = frame.id;
    this.emit("message", frame);
  }
}

function newRoom() { return { lastId: null, epoch: null, buffer: null }; }

function defaultUrl() {
  const proto = location.protocol === "https:" ? "wss:" : "ws:";
  return `${proto}//${location.host}/ws`;
}
