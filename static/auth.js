// Auth: who is signed in, through the server's /auth/* routes. The tokens live in
// HttpOnly cookies this code never sees; it only learns the user or the error.

/**
 * An /auth/* call that failed; `detail` is the server's message for the user. A sign-in
 * that meets a Cognito challenge fails with code "challenge": `data` then names it and
 * the fields to ask for (never Cognito's session, which stays on the server).
 */
export class AuthError extends Error {
  constructor(status, code, detail, data = {}) {
    super(detail || code || `HTTP ${status}`);
    this.status = status;
    this.code = code;
    this.detail = this.message;
    this.data = data;
  }
}

async function call(method, path, body) {
  const init = { method, credentials: "same-origin", headers: { Accept: "application/json" } };
  if (method !== "GET") {
    // The server wants JSON on every cookie-authenticated POST (a CSRF guard).
    init.headers["Content-Type"] = "application/json";
    if (body !== undefined) init.body = JSON.stringify(body);
  }
  const res = await fetch(path, init);
  let data = {};
  try { data = await res.json(); } catch { /* empty or non-JSON body */ }
  if (!res.ok) throw new AuthError(res.status, data.error, data.detail, data);
  return data;
}

/**
 * Events: "change" with detail {user} (null when signed out).
 * load() on page start; login(); logout(); plus checkSession() and refresh() for
 * the socket service.
 */
export class Auth extends EventTarget {
  constructor() {
    super();
    this.user = null;
  }

  setUser(user) {
    const changed = (user?.sub ?? null) !== (this.user?.sub ?? null);
    this.user = user;
    if (changed) this.dispatchEvent(new CustomEvent("change", { detail: { user } }));
  }

  /**
   * GET /auth/me, and on 401 one POST /auth/refresh (the access cookie lapses long before
   * the refresh cookie). Resolves to the user or null; rejects only when unreachable.
   */
  async load() {
    this.setUser(await this.me());
    return this.user;
  }

  async me() {
    try {
      return (await call("GET", "/auth/me")).user;
    } catch (err) {
      if (!(err instanceof AuthError) || err.status !== 401) throw err;
    }
    const result = await this.refresh();
    if (result === "unavailable") throw new AuthError(503, "unavailable", "cannot refresh now");
    return result === "ok" ? this.user : null;
  }

  /** POST /auth/login; rejects with AuthError (detail is shown to the user). */
  async login(username, password) {
    const { user } = await call("POST", "/auth/login", { username, password });
    this.setUser(user);
    return user;
  }

  /**
   * POST /auth/challenge with the answer ({new_password, attributes} or {code}); resolves
   * to the user, or rejects with AuthError: "challenge" (the next one), "invalid_code",
   * "invalid_password", "challenge_expired" (sign in again), ...
   */
  async answerChallenge(answer) {
    const { user } = await call("POST", "/auth/challenge", answer);
    this.setUser(user);
    return user;
  }

  /** POST /auth/logout; the server closes this user's sockets with 1000 "signed out". */
  async logout() {
    await call("POST", "/auth/logout");
    this.setUser(null);
  }

  /** Forget the user locally (the server refused the session). */
  signedOut() { this.setUser(null); }

  /** For the socket: "ok", "signed-out" (401 and no refresh), "error" (other answer) or "offline". */
  async checkSession() {
    try {
      return (await this.me()) ? "ok" : "signed-out";
    } catch (err) {
      return err instanceof AuthError ? "error" : "offline";
    }
  }

  /** POST /auth/refresh: "ok", "refused" (sign in again) or "unavailable" (try later). */
  async refresh() {
    try {
      const { user } = await call("POST", "/auth/refresh");
      if (user) this.setUser(user);
      return "ok";
    } catch (err) {
      return err instanceof AuthError && err.status < 500 ? "refused" : "unavailable";
    }
  }
}
