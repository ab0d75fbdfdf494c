// The payment page keeps itself current: a countdown to the code's expiry, a fresh code when the server
// issues one, and the invoice's final state (paid, expired, cancelled) without a reload.
(function () {
  "use strict";
  var root = document.documentElement;
  var card = document.getElementById("card");
  var d = card.dataset;

  // Language: both by default, or one; a choice is remembered on this phone. (Pressing the chosen one again used
  // to bring both back with no button saying so: found by a citizen's walk-through.)
  var langs = document.querySelectorAll(".lang");
  function showLang(lang) {
    if (lang === "km" || lang === "en") { root.setAttribute("data-show", lang); root.lang = lang; }
    else { root.removeAttribute("data-show"); root.lang = "km"; lang = ""; }
    for (var i = 0; i < langs.length; i++) langs[i].setAttribute("aria-pressed", String(langs[i].dataset.lang === lang));
    try { localStorage.setItem("paysvc.lang", lang); } catch (e) { /* private mode */ }
  }
  for (var i = 0; i < langs.length; i++) {
    langs[i].addEventListener("click", function (ev) {
      showLang(ev.currentTarget.dataset.lang);
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
  var held = document.getElementById("held");
  var live = document.getElementById("live");
  var stateUrl = "/pay/" + encodeURIComponent(d.invoice) + "/state";
  var opened = Date.now();
  var skew = (Date.parse(d.serverTime) - Date.now()) || 0;  // server clock minus ours
  var expiresAt = Date.parse(d.expiresAt) || 0;
  var failures = 0, retryAfter = 0, timer = 0, ticker = 0, busy = false, blobUrl = "", kicked = 0;

  // Announcements keep each language's words marked as such, so a screen reader reads each in its own voice.
  function say(parts) {
    live.textContent = "";
    setTimeout(function () {
      for (var i = 0; i < parts.length; i++) {
        var span = document.createElement("span");
        span.lang = parts[i][0];
        span.textContent = (i ? " / " : "") + parts[i][1];
        live.appendChild(span);
      }
    }, 50);
  }
  function partsOf(el) {
    var ts = el.querySelectorAll(".t"), out = [];
    for (var i = 0; i < ts.length; i++) out.push([ts[i].lang, ts[i].textContent]);
    return out;
  }
  function textOf(el) {
    return partsOf(el).map(function (p) { return p[1]; }).join(" / ");
  }
  // A request that hangs counts as a failure after 15 s (less when polling faster), rather than stopping the page's polling for good
  // (found by a citizen's walk-through: a stalled request froze it, saying nothing).
  // The timer runs until the body is read too: a response whose body stalls after its headers also held the
  // polling (found by review). Resolves to {r: response, body: read(response)}.
  function fetchWithin(url, options, read) {
    var ctl = window.AbortController ? new AbortController() : null, t = 0;
    if (ctl) {
      options.signal = ctl.signal;
      t = setTimeout(function () { ctl.abort(); }, Math.min(15000, Math.max(5000, 3 * BASE)));
    }
    return fetch(url, options)
      .then(function (r) { return read(r).then(function (body) { return {r: r, body: body}; }); })
      .finally(function () { clearTimeout(t); });
  }
  function qrShown() { return qr.complete && qr.naturalWidth > 0; }

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
    if (failures) {  // exponential back-off with jitter, at most 15 s (a code is on screen), or what the server
      // asked (up to a minute), and never sooner than a healthy page asks
      var wait = Math.min(15000, BASE * Math.pow(2, failures) * (0.75 + Math.random() / 2));
      return Math.max(BASE, Math.min(60000, retryAfter * 1000), wait);
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
    document.getElementById("pay-by-row").hidden = true;  // no longer a deadline
    if (blobUrl) { URL.revokeObjectURL(blobUrl); blobUrl = ""; }
    card.setAttribute("data-status", status);
    var section = card.querySelector(".st-" + status + " h1");
    if (section) { say(partsOf(section)); document.title = textOf(section); }
  }

  // Load the current code's image; its headers say which code it is, so the md5 and expiry shown always
  // belong to the image on screen.
  async function swap(url) {
    qrbox.classList.add("busy");
    var got = await fetchWithin(url, {cache: "no-store"}, function (r) { return r.ok ? r.blob() : Promise.resolve(null); });
    var r = got.r;
    if (r.status === 409) return false;  // no longer open: the next poll says why
    if (!r.ok) throw new Error("QR image: HTTP " + r.status);
    var md5 = r.headers.get("X-Khqr-Md5"), exp = Date.parse(r.headers.get("X-Khqr-Expires-At"));
    var u = URL.createObjectURL(got.body);
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
    say([["km", "កូដ QR ថ្មី"], ["en", "New QR code"]]);
    return true;
  }

  async function poll() {
    if (busy) return;
    busy = true;
    var again = true, delay = -1;
    try {
      var got = await fetchWithin(stateUrl, {cache: "no-store", headers: {Accept: "application/json"}},
                                  function (r) { return r.ok ? r.json() : Promise.resolve(null); });
      var r = got.r;
      if (r.status === 404) { finish("notfound"); again = false; return; }
      if (!r.ok) {
        retryAfter = Number(r.headers.get("Retry-After")) || 0;
        throw new Error("state: HTTP " + r.status);
      }
      var s = got.body;
      skew = Date.parse(s.server_time) - Date.now() || skew;
      if (held.hidden === !!s.payment_held) {
        held.hidden = !s.payment_held;
        if (s.payment_held) say(partsOf(held));
      }
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
        if (qrShown()) qrbox.classList.remove("busy");
        else if (qr.complete) await swap(s.qr_svg_url);  // the image failed to load: fetch it again
      }
      failures = 0; retryAfter = 0;
      offline.hidden = true;
    } catch (e) {
      failures = Math.min(failures + 1, 10);
      // At once after a request given up (15 s of nothing already), else from the second failure (no flicker)
      if ((failures > 1 || e.name === "AbortError") && offline.hidden) { offline.hidden = false; say(partsOf(offline).slice(0, 2)); }
    } finally {
      busy = false;
      if (again) schedule(delay >= 0 ? delay : nextDelay());
    }
  }

  function onVisible() { if (!document.hidden) schedule(0); }
  document.addEventListener("visibilitychange", onVisible);
  // Back online: ask at once rather than wait out the back-off (up to 15 s)
  window.addEventListener("online", function () { failures = 0; schedule(0); });
  document.getElementById("retry").addEventListener("click", function () { failures = 0; retryAfter = 0; schedule(0); });
  // The first image may be slow to come: say so rather than show an empty square beside a running countdown
  if (!qr.complete) {
    qrbox.classList.add("busy");
    qr.addEventListener("load", function () { if (expiresAt > Date.now() + skew) qrbox.classList.remove("busy"); });
  }
  ticker = setInterval(tick, 1000);
  tick();
  schedule(BASE);
})();
