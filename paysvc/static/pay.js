// The payment page keeps itself current: a countdown to the code's expiry, a fresh code when the server
// issues one, and the invoice's final state (paid, expired, cancelled) without a reload.
(function () {
  "use strict";
  var root = document.documentElement;
  var card = document.getElementById("card");
  var d = card.dataset;

  // Language: both by default; a choice is remembered on this phone.
  var langs = document.querySelectorAll(".lang");
  function showLang(lang) {
    if (lang === "km" || lang === "en") { root.setAttribute("data-show", lang); root.lang = lang; }
    else { root.removeAttribute("data-show"); root.lang = "km"; lang = ""; }
    for (var i = 0; i < langs.length; i++) langs[i].setAttribute("aria-pressed", String(langs[i].dataset.lang === lang));
    try { localStorage.setItem("paysvc.lang", lang); } catch (e) { /* private mode */ }
  }
  for (var i = 0; i < langs.length; i++) {
    langs[i].addEventListener("click", function (ev) {
      var lang = ev.currentTarget.dataset.lang;
      showLang(root.getAttribute("data-show") === lang ? "" : lang);
    });
  }
  try { showLang(localStorage.getItem("paysvc.lang") || ""); } catch (e) { /* private mode */ }

  if (!d.invoice || d.status !== "open") return;

  var BASE = Math.min(60, Math.max(1, Number(d.poll) || 5)) * 1000;
  var MAX = Math.max(BASE, 30000);
  var qrbox = document.getElementById("qrbox");
  var qr = document.getElementById("qr");
  var countdown = document.getElementById("countdown");
  var offline = document.getElementById("offline");
  var live = document.getElementById("live");
  var stateUrl = "/pay/" + encodeURIComponent(d.invoice) + "/state";
  var opened = Date.now();
  var skew = (Date.parse(d.serverTime) - Date.now()) || 0;  // server clock minus ours
  var expiresAt = Date.parse(d.expiresAt) || 0;
  var failures = 0, retryAfter = 0, timer = 0, ticker = 0, busy = false, blobUrl = "", kicked = 0;

  function say(text) { live.textContent = ""; setTimeout(function () { live.textContent = text; }, 50); }
  function textOf(el) {
    var parts = el.querySelectorAll(".t"), out = [];
    for (var i = 0; i < parts.length; i++) out.push(parts[i].textContent);
    return out.join(" / ");
  }

  function mmss(ms) {
    var s = Math.max(0, Math.ceil(ms / 1000)), m = Math.floor(s / 60);
    s = s % 60;
    return (m < 10 ? "0" : "") + m + ":" + (s < 10 ? "0" : "") + s;
  }
  function tick() {
    var left = expiresAt - (Date.now() + skew);
    countdown.textContent = mmss(left);
    if (left <= 0 && kicked !== expiresAt) {  // once per code: a failing server still gets its back-off
      kicked = expiresAt;
      qrbox.classList.add("busy");
      if (!busy) schedule(0);
    }
  }

  function schedule(ms) { clearTimeout(timer); timer = setTimeout(poll, ms); }
  function nextDelay() {
    if (failures) {  // exponential back-off with jitter, at most a minute, or what the server asked
      var wait = Math.min(60000, BASE * Math.pow(2, failures));
      return Math.max(retryAfter * 1000, wait * (0.75 + Math.random() / 2));
    }
    // Slower the longer the page stays open, and slow while nobody is looking.
    var delay = BASE * (1 + Math.floor((Date.now() - opened) / 600000));
    if (document.hidden) delay = Math.max(delay, 30000);
    return Math.min(delay, MAX);
  }

  // When it was paid, in Phnom Penh's time (UTC+7, no summer time), as the server writes it: 27/11/2026 09:31.
  function showPaidAt(iso) {
    var t = new Date(Date.parse(iso) + 7 * 3600000);
    if (isNaN(t.getTime())) return;
    function two(n) { return (n < 10 ? "0" : "") + n; }
    document.getElementById("paid-at").textContent = two(t.getUTCDate()) + "/" + two(t.getUTCMonth() + 1) + "/" +
      t.getUTCFullYear() + " " + two(t.getUTCHours()) + ":" + two(t.getUTCMinutes());
    document.getElementById("paid-row").hidden = false;
  }

  // The payment's reference at its provider, as the citizen's bank app shows it (textContent: never markup).
  function showReference(provider, reference) {
    document.getElementById("paid-with").textContent = provider || "";
    document.getElementById("payment-ref").textContent = reference;
    document.getElementById("ref-row").hidden = false;
  }

  function finish(status) {
    clearTimeout(timer); clearInterval(ticker);
    document.removeEventListener("visibilitychange", onVisible);
    if (blobUrl) { URL.revokeObjectURL(blobUrl); blobUrl = ""; }
    card.setAttribute("data-status", status);
    var section = card.querySelector(".st-" + status + " h1");
    if (section) { say(textOf(section)); document.title = textOf(section); }
  }

  // Load the current code's image; its headers say which code it is, so the md5 and expiry shown always
  // belong to the image on screen.
  async function swap(url) {
    qrbox.classList.add("busy");
    var r = await fetch(url, {cache: "no-store"});
    if (r.status === 409) return false;  // no longer open: the next poll says why
    if (!r.ok) throw new Error("QR image: HTTP " + r.status);
    var md5 = r.headers.get("X-Khqr-Md5"), exp = Date.parse(r.headers.get("X-Khqr-Expires-At"));
    var u = URL.createObjectURL(await r.blob());
    var img = new Image();
    img.src = u;
    try { await img.decode(); } catch (e) { URL.revokeObjectURL(u); throw e; }
    qr.src = u;
    if (blobUrl) URL.revokeObjectURL(blobUrl);
    blobUrl = u;
    card.setAttribute("data-md5", md5);
    expiresAt = exp;
    qrbox.classList.remove("busy");
    tick();
    say("កូដ QR ថ្មី / New QR code");
    return true;
  }

  async function poll() {
    if (busy) return;
    busy = true;
    var again = true, delay = -1;
    try {
      var r = await fetch(stateUrl, {cache: "no-store", headers: {Accept: "application/json"}});
      if (r.status === 404) { finish("notfound"); again = false; return; }
      if (!r.ok) {
        retryAfter = Number(r.headers.get("Retry-After")) || 0;
        throw new Error("state: HTTP " + r.status);
      }
      var s = await r.json();
      skew = Date.parse(s.server_time) - Date.now() || skew;
      if (s.status !== "open") {
        if (s.paid_at) showPaidAt(s.paid_at);
        if (s.payment_reference) showReference(s.paid_with, s.payment_reference);
        finish(s.status); again = false; return;
      }
      // Any code the invoice issued pays it: swap only for one that lives longer than the one shown.
      if (s.khqr && s.khqr.md5 !== card.getAttribute("data-md5") && Date.parse(s.khqr.expires_at) > expiresAt) {
        if (!(await swap(s.qr_svg_url))) delay = 500;
      } else if (s.khqr && s.khqr.md5 === card.getAttribute("data-md5")) {
        expiresAt = Date.parse(s.khqr.expires_at);
        qrbox.classList.remove("busy");
      }
      failures = 0; retryAfter = 0;
      offline.hidden = true;
    } catch (e) {
      failures = Math.min(failures + 1, 10);
      if (failures > 1 && offline.hidden) { offline.hidden = false; say(textOf(offline)); }
    } finally {
      busy = false;
      if (again) schedule(delay >= 0 ? delay : nextDelay());
    }
  }

  function onVisible() { if (!document.hidden) schedule(0); }
  document.addEventListener("visibilitychange", onVisible);
  // Back online: ask at once rather than wait out the back-off (up to a minute)
  window.addEventListener("online", function () { failures = 0; schedule(0); });
  ticker = setInterval(tick, 1000);
  tick();
  schedule(BASE);
})();
