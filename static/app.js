// The page: sign-in form, rooms, messages, presence, composer and status line.
// User data reaches the DOM only through textContent, never as HTML.

import { Auth } from "./auth.js";
import { ChatSocket } from "./socket.js";

const LOBBY = "lobby";
const ROOM_NAME = /^[A-Za-z0-9_.-]{1,64}$/;
const MAX_MESSAGES_PER_ROOM = 500;
const HUES = 8;

const $ = (id) => document.getElementById(id);
const el = {
  status: $("status"), statusText: $("status-text"), countdown: $("status-countdown"),
  account: $("account"), me: $("me"), logout: $("logout"),
  loginView: $("login-view"), loginForm: $("login-form"), username: $("username"),
  password: $("password"), loginError: $("login-error"), loginSubmit: $("login-submit"),
  chatView: $("chat-view"), rooms: $("rooms"), joinForm: $("join-form"),
  roomInput: $("room-input"), joinError: $("join-error"),
  roomTitle: $("room-title"), messages: $("messages"), composer: $("composer"),
  messageInput: $("message-input"), send: $("send"), composerNote: $("composer-note"),
  presence: $("presence"), presenceTitle: $("presence-title"),
  challengeForm: $("challenge-form"), challengeTitle: $("challenge-title"),
  challengeHint: $("challenge-hint"), challengeRules: $("challenge-rules"),
  challengeSetup: $("challenge-setup"), challengeQr: $("challenge-qr"),
  challengeSecret: $("challenge-secret"), challengeUri: $("challenge-uri"),
  challengeFields: $("challenge-fields"), challengeError: $("challenge-error"),
  challengeSubmit: $("challenge-submit"), challengeCancel: $("challenge-cancel"),
};

const auth = new Auth();
const socket = new ChatSocket({
  checkSession: () => auth.checkSession(),
  refresh: () => auth.refresh(),
});

// room -> {joined, messages: [frame|note], unread, members: Map(sub -> username)}
let rooms = new Map();
let current = LOBBY;
let countdownTimer = null;
let signingOut = false;
const unacked = new Map();   // publish ref -> text, to give the text back if it is refused

function newRoomView() {
  return { joined: false, messages: [], unread: 0, members: new Map() };
}

function resetRooms() {
  rooms = new Map([[LOBBY, newRoomView()]]);
  current = LOBBY;
  unacked.clear();
}

// ---- views ------------------------------------------------------------------------------

function showLogin(error = "") {
  el.chatView.hidden = true;
  el.account.hidden = true;
  el.loginView.hidden = false;
  el.challengeForm.hidden = true;
  el.loginForm.hidden = false;
  el.loginError.textContent = error;
  el.loginSubmit.disabled = false;
  el.username.focus();
}

function showChat(user) {
  el.loginView.hidden = true;
  el.chatView.hidden = false;
  el.account.hidden = false;
  el.me.textContent = user.username;
  el.password.value = "";
  resetRooms();
  renderAll();
  el.messageInput.focus();
}

function renderAll() {
  renderRooms();
  renderMessages();
  renderPresence();
  renderComposer();
}

function renderRooms() {
  const items = [...rooms.entries()].map(([name, view]) => {
    const li = document.createElement("li");
    li.className = "room";
    li.dataset.room = name;
    const select = document.createElement("button");
    select.type = "button";
    select.className = "room-select";
    if (name === current) select.setAttribute("aria-current", "true");
    const label = document.createElement("span");
    label.className = "room-name";
    label.textContent = `# ${name}`;
    select.append(label);
    if (!view.joined) select.append(badge("joining…", "room-pending"));
    else if (view.unread) select.append(badge(String(view.unread), "room-unread", `${view.unread} unread`));
    select.addEventListener("click", () => selectRoom(name));
    li.append(select);
    if (name !== LOBBY) {
      const leave = document.createElement("button");
      leave.type = "button";
      leave.className = "room-leave";
      leave.textContent = "×";
      leave.setAttribute("aria-label", `Leave ${name}`);
      leave.title = `Leave ${name}`;
      leave.addEventListener("click", () => leaveRoom(name));
      li.append(leave);
    }
    return li;
  });
  el.rooms.replaceChildren(...items);
}

function badge(text, className, label) {
  const span = document.createElement("span");
  span.className = `badge ${className}`;
  span.textContent = text;
  if (label) span.setAttribute("aria-label", label);
  return span;
}

function renderMessages() {
  const view = rooms.get(current);
  el.roomTitle.textContent = `# ${current}`;
  el.messages.setAttribute("aria-busy", "true");
  el.messages.replaceChildren(...view.messages.map(messageItem));
  el.messages.removeAttribute("aria-busy");
  el.messages.scrollTop = el.messages.scrollHeight;
}

function messageItem(item) {
  const li = document.createElement("li");
  if (item.note) {
    li.className = `note note-${item.kind}`;
    li.textContent = item.note;
    return li;
  }
  const mine = item.user === auth.user?.sub;
  li.className = mine ? "message own" : "message";
  li.dataset.id = item.id;
  const avatar = document.createElement("span");
  avatar.className = `avatar hue-${hue(item.username || item.user)}`;
  avatar.setAttribute("aria-hidden", "true");
  avatar.textContent = (item.username || "?").slice(0, 1).toUpperCase();
  const name = document.createElement("span");
  name.className = "username";
  name.textContent = item.username || item.user;
  const time = document.createElement("time");
  time.className = "time";
  const when = new Date(item.ts);
  time.dateTime = when.toISOString();
  time.title = when.toLocaleString();
  time.textContent = when.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" });
  const head = document.createElement("div");
  head.className = "message-head";
  head.append(name, time);
  const text = document.createElement("p");
  text.className = "text";
  text.textContent = item.message;
  const body = document.createElement("div");
  body.className = "message-body";
  body.append(head, text);
  li.append(avatar, body);
  return li;
}

function hue(name) {
  let h = 0;
  for (const ch of String(name)) h = (h * 31 + ch.codePointAt(0)) >>> 0;
  return h % HUES;
}

function renderPresence() {
  const view = rooms.get(current);
  el.presenceTitle.textContent = `Online in # ${current} · ${view.members.size}`;
  const people = [...view.members.entries()]
    .sort((a, b) => a[1].localeCompare(b[1]))
    .map(([sub, username]) => {
      const li = document.createElement("li");
      li.className = "member";
      li.dataset.sub = sub;
      const dot = document.createElement("span");
      dot.className = "presence-dot";
      dot.setAttribute("aria-hidden", "true");
      const name = document.createElement("span");
      name.className = "member-name";
      name.textContent = sub === auth.user?.sub ? `${username} (you)` : username;
      li.append(dot, name);
      return li;
    });
  el.presence.replaceChildren(...people);
}

function renderComposer() {
  const view = rooms.get(current);
  let reason = "";
  if (socket.state === "offline") reason = "You are offline. Messages can be sent once reconnected.";
  else if (socket.state !== "connected") reason = "Not connected. Messages can be sent once reconnected.";
  else if (!view.joined) reason = `Joining # ${current}…`;
  const disabled = reason !== "";
  el.messageInput.disabled = disabled;
  el.send.disabled = disabled;
  el.composer.classList.toggle("is-disabled", disabled);
  if (disabled || !el.composerNote.classList.contains("is-error")) {
    el.composerNote.classList.remove("is-error");
    el.composerNote.textContent = reason;
  }
}

function renderStatus({ state, retryAt, instance, lastClose }) {
  el.status.dataset.state = state;
  if (lastClose) el.status.dataset.lastClose = String(lastClose);
  if (instance) el.status.dataset.instance = instance;
  else delete el.status.dataset.instance;
  el.status.title = instance ? `Connected to ${instance}` : "";
  const labels = {
    connecting: "connecting…", connected: "connected", reconnecting: "reconnecting",
    offline: "offline", "signed-out": "signed out",
  };
  el.statusText.textContent = labels[state] ?? state;
  clearInterval(countdownTimer);
  countdownTimer = null;
  el.countdown.textContent = "";
  if (retryAt) {
    const tick = () => {
      const seconds = Math.max(0, Math.ceil((retryAt - Date.now()) / 1000));
      const prefix = state === "offline" ? " · retrying" : "";
      el.countdown.textContent = seconds > 0 ? `${prefix} in ${seconds} s` : `${prefix} now…`;
    };
    tick();
    countdownTimer = setInterval(tick, 250);
  }
}

// ---- state changes ----------------------------------------------------------------------

function addItem(room, item) {
  const view = rooms.get(room);
  if (!view) return;
  view.messages.push(item);
  if (view.messages.length > MAX_MESSAGES_PER_ROOM) {
    view.messages.splice(0, view.messages.length - MAX_MESSAGES_PER_ROOM);
    if (room === current) el.messages.firstElementChild?.remove();
  }
  if (room !== current) {
    if (!item.note) { view.unread += 1; renderRooms(); }
    return;
  }
  const nearBottom = el.messages.scrollHeight - el.messages.scrollTop - el.messages.clientHeight < 80;
  el.messages.append(messageItem(item));
  if (nearBottom || item.user === auth.user?.sub) el.messages.scrollTop = el.messages.scrollHeight;
}

function selectRoom(name) {
  const view = rooms.get(name);
  if (!view) return;
  current = name;
  view.unread = 0;
  renderAll();
}

function joinRoom(name) {
  if (!rooms.has(name)) {
    rooms.set(name, newRoomView());
    socket.join(name);       // sent now, or on the next welcome while disconnected
  }
  selectRoom(name);
}

function leaveRoom(name) {
  socket.leave(name);
  rooms.delete(name);
  if (current === name) current = LOBBY;
  renderAll();
}

function setComposerError(text) {
  el.composerNote.textContent = text;
  el.composerNote.classList.toggle("is-error", text !== "");
}

socket.addEventListener("status", ({ detail }) => {
  renderStatus(detail);
  if (detail.state !== "connected") {
    for (const view of rooms.values()) view.joined = false;
    unacked.clear();           // in flight when the socket dropped: fate unknown
  }
  if (detail.state === "signed-out" && auth.user) {
    auth.signedOut();
    resetRooms();
    showLogin(signingOut ? "" : sessionEndedText(detail));
  }
  if (!el.chatView.hidden) { renderRooms(); renderComposer(); }
});

socket.addEventListener("joined", ({ detail }) => {
  const view = rooms.get(detail.room);
  if (!view) return;
  view.joined = true;
  socket.members(detail.room);
  renderRooms();
  if (detail.room === current) renderComposer();
});

socket.addEventListener("left", ({ detail }) => {
  if (!rooms.delete(detail.room)) return;
  if (current === detail.room) current = LOBBY;
  if (detail.reason === "revoked") el.joinError.textContent = `You no longer have access to # ${detail.room}.`;
  renderAll();
});

// A join the room rules refuse (same answer whether or not the room exists).
socket.addEventListener("refused", ({ detail }) => {
  rooms.delete(detail.room);
  if (current === detail.room) current = LOBBY;
  el.joinError.textContent = `You may not join # ${detail.room}.`;
  renderAll();
});

socket.addEventListener("message", ({ detail }) => addItem(detail.room, detail));

socket.addEventListener("reset", ({ detail }) => {
  const view = rooms.get(detail.room);
  if (!view) return;
  view.messages = [];
  addItem(detail.room, { note: "History gap: some earlier messages are no longer available.", kind: "gap" });
  if (detail.room === current) renderMessages();
});

socket.addEventListener("members", ({ detail }) => {
  const view = rooms.get(detail.room);
  if (!view) return;
  view.members = new Map((detail.members ?? []).map((m) => [m.sub, m.username]));
  if (detail.room === current) renderPresence();
});

socket.addEventListener("presence", ({ detail }) => {
  const view = rooms.get(detail.room);
  if (!view || !detail.user) return;
  if (detail.event === "join") view.members.set(detail.user.sub, detail.user.username);
  else if (detail.event === "leave") view.members.delete(detail.user.sub);
  if (detail.room === current) renderPresence();
});

socket.addEventListener("error", ({ detail }) => {
  const text = detail.detail || detail.code || "error";
  if (!detail.ref) return addItem(current, { note: `Server: ${text}`, kind: "error" });
  setComposerError(`Not sent: ${text}`);
  const refused = unacked.get(detail.ref);
  unacked.delete(detail.ref);
  if (refused && !el.messageInput.value) el.messageInput.value = refused;
  return undefined;
});

socket.addEventListener("ack", ({ detail }) => {
  unacked.delete(detail.ref);
  setComposerError("");
});

/** By close code: 1000 is the server's sign-out (this tab or another). */
function sessionEndedText({ lastClose, reason }) {
  if (lastClose === 1000 || !reason) return "You were signed out. Please sign in again.";
  return `Your session ended (${reason}). Please sign in again.`;
}

// ---- sign-in challenges (Cognito: new password, MFA code, TOTP set-up) --------------------

const CHALLENGE_TEXT = {
  NEW_PASSWORD_REQUIRED: ["Choose a new password", "Your account needs a new password before you can sign in."],
  SOFTWARE_TOKEN_MFA: ["Enter your code", "Enter the 6-digit code from your authenticator app."],
  SMS_MFA: ["Enter your code", "Enter the code we sent by text message"],
  MFA_SETUP: ["Set up your authenticator", "Scan the QR code with an authenticator app, then enter the 6-digit code it shows."],
};

function addField(name, label, attrs) {
  const id = `challenge-${name}`;
  const labelEl = document.createElement("label");
  labelEl.htmlFor = id;
  labelEl.textContent = label;
  const input = document.createElement("input");
  Object.assign(input, { id, name, required: true, maxLength: 256, ...attrs });
  el.challengeFields.append(labelEl, input);
  return input;
}

/** Show the form for the challenge a 409 named; `data` is the server's answer. */
function showChallenge(data) {
  const [title, hint] = CHALLENGE_TEXT[data.challenge] ?? ["One more step", ""];
  el.loginForm.hidden = true;
  el.challengeForm.hidden = false;
  el.challengeForm.dataset.challenge = data.challenge;
  el.challengeTitle.textContent = title;
  el.challengeHint.textContent = data.destination ? `${hint} to ${data.destination}.` : hint;
  el.challengeRules.hidden = !data.password_rules;
  el.challengeRules.textContent = data.password_rules ? `Password rules: ${data.password_rules}.` : "";
  el.challengeSetup.hidden = data.challenge !== "MFA_SETUP";
  if (data.challenge === "MFA_SETUP") {
    el.challengeQr.src = data.qr;  // an SVG data: URI drawn by the server, no third party
    el.challengeSecret.textContent = data.secret;
    el.challengeUri.href = data.otpauth;
  }
  el.challengeFields.replaceChildren();
  el.challengeError.textContent = "";
  el.challengeSubmit.disabled = false;
  let first = null;
  for (const field of data.fields ?? []) {
    const input = field === "new_password"
      ? addField(field, "New password", { type: "password", autocomplete: "new-password" })
      : field === "code"
        ? addField(field, "Code", { type: "text", inputMode: "numeric", autocomplete: "one-time-code", maxLength: 8 })
        : addField(`attr-${field}`, field.replaceAll("_", " "), { type: "text" });
    first ??= input;
  }
  first?.focus();
}

function challengeAnswer() {
  const answer = {};
  const attributes = {};
  for (const input of el.challengeFields.querySelectorAll("input")) {
    if (input.name === "new_password") answer.new_password = input.value;
    else if (input.name === "code") answer.code = input.value.trim();
    else attributes[input.name.slice("attr-".length)] = input.value;
  }
  if (Object.keys(attributes).length) answer.attributes = attributes;
  return answer;
}

function signedIn() {
  signingOut = false;
  showChat(auth.user);
  socket.start();
}

el.challengeForm.addEventListener("submit", async (ev) => {
  ev.preventDefault();
  el.challengeError.textContent = "";
  el.challengeSubmit.disabled = true;
  try {
    await auth.answerChallenge(challengeAnswer());
    signedIn();
  } catch (err) {
    el.challengeSubmit.disabled = false;
    if (err.code === "challenge") return showChallenge(err.data);
    if (err.code === "challenge_expired") return showLogin(err.detail);
    el.challengeError.textContent = err.detail ?? "Cannot reach the server. Try again.";
    el.challengeFields.querySelector("input")?.focus();
  }
});

el.challengeCancel.addEventListener("click", () => showLogin());

// ---- user actions -----------------------------------------------------------------------

el.loginForm.addEventListener("submit", async (ev) => {
  ev.preventDefault();
  const username = el.username.value.trim();
  if (!username) {
    el.loginError.textContent = "Enter your username.";
    el.username.focus();
    return;
  }
  el.loginError.textContent = "";
  el.loginSubmit.disabled = true;
  try {
    await auth.login(username, el.password.value);
    signedIn();
  } catch (err) {
    el.loginSubmit.disabled = false;
    if (err.code === "challenge" && err.data.fields) return showChallenge(err.data);
    el.loginError.textContent = err.detail ?? "Cannot reach the server. Try again.";
    el.password.focus();
  }
});

el.logout.addEventListener("click", async () => {
  signingOut = true;
  el.logout.disabled = true;
  try {
    await auth.logout();
    socket.stop("signed-out", "signed out");
    resetRooms();
    showLogin();
  } catch (err) {
    signingOut = false;
    addItem(current, { note: `Sign-out failed: ${err.detail ?? "server unreachable"}`, kind: "error" });
  } finally {
    el.logout.disabled = false;
  }
});

el.joinForm.addEventListener("submit", (ev) => {
  ev.preventDefault();
  const name = el.roomInput.value.trim();
  if (!ROOM_NAME.test(name)) {
    el.joinError.textContent = "Room names are 1–64 letters, digits, “_”, “.” or “-”.";
    el.roomInput.setAttribute("aria-invalid", "true");
    return;
  }
  el.joinError.textContent = "";
  el.roomInput.removeAttribute("aria-invalid");
  el.roomInput.value = "";
  joinRoom(name);
});

el.roomInput.addEventListener("input", () => {
  el.joinError.textContent = "";
  el.roomInput.removeAttribute("aria-invalid");
});

el.composer.addEventListener("submit", (ev) => {
  ev.preventDefault();
  const text = el.messageInput.value;
  if (!text.trim()) return;
  const ref = socket.publish(current, text);
  if (ref) {
    unacked.set(ref, text);
    el.messageInput.value = "";
    setComposerError("");
  } else {
    setComposerError("Not sent: not connected.");
  }
});

// ---- start ------------------------------------------------------------------------------

async function boot() {
  renderStatus({ state: "connecting" });
  try {
    const user = await auth.load();
    if (user) {
      showChat(user);
      socket.start();
    } else {
      renderStatus({ state: "signed-out" });
      showLogin();
    }
  } catch {
    renderStatus({ state: "offline" });
    showLogin("Cannot reach the server. Try again.");
  }
}

boot();
