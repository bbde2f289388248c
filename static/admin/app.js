/* iflow2api web admin: one page, vanilla JS, no build step.
 *
 * It talks only to the JSON API under /admin/api/. The session lives in an HttpOnly
 * cookie that this script never sees; every change (POST/PUT/DELETE) carries the CSRF
 * token that the session, setup and login answers hand out.
 * Dynamic text is always set with textContent, never innerHTML: log lines, account
 * labels and model answers come from outside and must not become markup.
 */
(function () {
  'use strict';

  const t = window.I18n.t;
  const POLL_MS = 2000;            // dashboard numbers refresh this often
  const OAUTH_POLL_MS = 1000;      // browser sign-in state is checked this often
  const MAX_LOG_LINES = 1000;      // the live log keeps this many lines in the page
  const STORE = {
    theme: 'iflow2api.theme', lang: 'iflow2api.lang', tab: 'iflow2api.tab', model: 'iflow2api.model',
    pgApi: 'iflow2api.playgroundApi', // the playground's API: "chat" or "responses"
    updateDismissed: 'iflow2api.updateDismissed', // the release version whose notice was dismissed
  };
  // The tabs themselves (what each loads, draws and does) are the SCREENS registry near the end.

  const state = {
    csrf: null,
    loggedIn: false,
    version: '',
    tab: 'dashboard',
    pollTimer: null,
    logSource: null,
    logRetryTimer: null,
    logLines: [],
    logRenderQueued: false,
    update: null,              // {latest, current, url} from the last status answer, or null
    presets: new Set(),        // provider preset names seen (unconfigured providers are presets)
    config: null,              // last GET /admin/api/config answer
    keysExist: false,          // any client API key? then curl needs an Authorization header
    oauth: null,               // {session, timer} while a browser sign-in runs
    pgAbort: null,             // AbortController of the running playground request
    pgMeta: null,              // () => the playground's status line, said again on a language change
    loginWaitTimer: null,
  };

  // ---------------------------------------------------------------------------------
  // Small DOM helpers

  function $(sel, root) { return (root || document).querySelector(sel); }
  function $$(sel, root) { return Array.prototype.slice.call((root || document).querySelectorAll(sel)); }

  /** el('button', {class: 'x', 'data-action': 'stop', text: 'Stop'}, child...) */
  function el(tag, attrs) {
    const node = document.createElement(tag);
    Object.keys(attrs || {}).forEach(function (name) {
      const value = attrs[name];
      if (value === null || value === undefined || value === false) return;
      if (name === 'text') node.textContent = value;
      else if (name === 'class') node.className = value;
      else node.setAttribute(name, value === true ? '' : String(value));
    });
    for (let i = 2; i < arguments.length; i++) {
      const child = arguments[i];
      if (child !== null && child !== undefined) node.appendChild(typeof child === 'string' ? document.createTextNode(child) : child);
    }
    return node;
  }

  function storeGet(key) {
    try { return window.localStorage.getItem(key); } catch (e) { return null; } // private mode
  }
  function storeSet(key, value) {
    try { window.localStorage.setItem(key, value); } catch (e) { /* not remembered, still works */ }
  }

  // ---------------------------------------------------------------------------------
  // Formatting

  function fmtInt(n) { return typeof n === 'number' && isFinite(n) ? String(Math.round(n)) : '–'; }

  function fmtMs(n) {
    if (typeof n !== 'number' || !isFinite(n)) return '–';
    return (n >= 100 ? Math.round(n) : Math.round(n * 10) / 10) + ' ms';
  }

  function fmtDuration(seconds) {
    if (typeof seconds !== 'number' || !isFinite(seconds)) return '–';
    let s = Math.max(0, Math.floor(seconds));
    const d = Math.floor(s / 86400); s -= d * 86400;
    const h = Math.floor(s / 3600); s -= h * 3600;
    const m = Math.floor(s / 60); s -= m * 60;
    const parts = [];
    if (d) parts.push(d + t('unit.d'));
    if (d || h) parts.push(h + t('unit.h'));
    if (!d && (h || m)) parts.push(m + t('unit.m'));
    if (!d && !h) parts.push(s + t('unit.s'));
    return parts.join(' ');
  }

  /** Expiry as sent by the server: a date string, epoch seconds or nothing. */
  function fmtExpiry(value) {
    if (value === null || value === undefined || value === '') return '–';
    const date = typeof value === 'number' ? new Date(value * (value < 1e12 ? 1000 : 1)) : new Date(value);
    return isNaN(date.getTime()) ? String(value) : date.toLocaleString(langTag());
  }

  // ---------------------------------------------------------------------------------
  // Toast: one line of feedback for the last action (tests read #toast)

  let toastTimer = null;
  function toast(message, kind) {
    const box = $('#toast');
    box.textContent = message;
    box.dataset.kind = kind || 'info';
    box.hidden = false;
    clearTimeout(toastTimer);
    toastTimer = setTimeout(function () { box.hidden = true; }, kind === 'error' ? 8000 : 4000);
  }

  /** What to tell the user about an error; '' when it was already handled (signed out). */
  function errorText(err) {
    if (err && err.silent) return '';
    return (err && err.message) || String(err);
  }

  function reportError(err) {
    const message = errorText(err);
    if (message) toast(message, 'error');
  }

  // ---------------------------------------------------------------------------------
  // API access

  class ApiError extends Error {
    constructor(status, message, code, retryAfter) {
      super(message);
      this.status = status;
      this.code = code || '';
      this.retryAfter = retryAfter || 0;
      this.silent = false;
    }
  }

  async function readJson(res) {
    const text = await res.text();
    if (!text) return {};
    try { return JSON.parse(text); } catch (e) { return { error: { message: text.slice(0, 300) } }; }
  }

  function errorFrom(res, data) {
    const info = (data && data.error) || {};
    const message = typeof info === 'string' ? info : (info.message || (res.status + ' ' + res.statusText));
    const retry = parseInt(res.headers.get('retry-after') || '0', 10) || 0;
    return new ApiError(res.status, message, info.code || info.type, retry);
  }

  function requestOptions(method, body, signal) {
    const headers = {};
    const opts = { method: method, headers: headers, credentials: 'same-origin', cache: 'no-store' };
    if (body !== undefined) {
      headers['Content-Type'] = 'application/json';
      opts.body = JSON.stringify(body);
    }
    if (method !== 'GET' && state.csrf) headers['X-CSRF-Token'] = state.csrf;
    if (signal) opts.signal = signal;
    return opts;
  }

  /**
   * fetch /admin/api/<path> and return the parsed JSON, or throw ApiError.
   * A 401 means the session is gone: back to the login screen (unless `opts.keep401`,
   * used where 401 means "wrong password" rather than "signed out").
   */
  async function api(method, path, body, opts) {
    opts = opts || {};
    let res;
    try {
      res = await fetch('/admin/api/' + path, requestOptions(method, body, opts.signal));
    } catch (e) {
      if (e && e.name === 'AbortError') throw e;
      throw new ApiError(0, t('error.network'), 'network');
    }
    const data = await readJson(res);
    if (res.ok) return data;
    const err = errorFrom(res, data);
    if (res.status === 401 && !opts.keep401) {
      signedOut(true);
      err.silent = true;
    }
    throw err;
  }

  function enc(part) { return encodeURIComponent(part); }

  // ---------------------------------------------------------------------------------
  // Forms: every "check the input, send it, show the outcome" action goes through submitForm

  /** A problem with the input, found before anything is sent (see refuse). */
  class Refusal extends Error {
    constructor(message, kind) {
      super(message);
      this.kind = kind || 'error';
    }
  }

  /** Stop a form's read(): show the message (none: stop quietly), send nothing. */
  function refuse(message, kind) { throw new Refusal(message || '', kind); }

  /**
   * The handler of a form's submit (or a button's click), from a spec:
   *   button           selector of the button that is disabled while the request runs
   *   error            optional selector of the form's error line; without it messages are toasts
   *   read()           the request from the inputs; calls refuse(message) when they are not usable
   *   send(input)      the API call; resolves to its answer
   *   done(answer, input)  show the success: toast, clear inputs, redraw (may be async)
   *   failed(err)      optional: the text to show for a failed send, or nothing when it handled
   *                    the error itself; by default the error's own message
   */
  function submitForm(spec) {
    const say = function (message, kind) {
      if (!message) return;
      if (spec.error) $(spec.error).textContent = message;
      else toast(message, kind);
    };
    return async function (event) {
      if (event) event.preventDefault();
      if (spec.error) $(spec.error).textContent = '';
      let input;
      try {
        input = spec.read ? spec.read() : undefined;
      } catch (err) {
        return say(err.message, err.kind || 'error');
      }
      const button = $(spec.button);
      let failure = null;
      button.disabled = true;
      try {
        const answer = await spec.send(input);
        if (spec.done) await spec.done(answer, input);
      } catch (err) {
        failure = err;
      } finally {
        button.disabled = false;
      }
      // After the button is back, so failed() may disable it again (login: wait before retrying).
      if (failure) say(spec.failed ? spec.failed(failure) : errorText(failure), 'error');
    };
  }

  // ---------------------------------------------------------------------------------
  // Theme and language (both remembered in localStorage)

  const darkQuery = window.matchMedia ? window.matchMedia('(prefers-color-scheme: dark)') : null;

  function themePreference() {
    const saved = storeGet(STORE.theme);
    return saved === 'light' || saved === 'dark' ? saved : 'system';
  }

  function applyTheme() {
    const pref = themePreference();
    const dark = pref === 'dark' || (pref === 'system' && darkQuery !== null && darkQuery.matches);
    document.documentElement.dataset.theme = dark ? 'dark' : 'light';
    $('#theme-select').value = pref;
  }

  function initialLanguage() {
    const saved = storeGet(STORE.lang);
    if (saved === 'en' || saved === 'zh') return saved;
    const langs = navigator.languages && navigator.languages.length ? navigator.languages : [navigator.language || 'en'];
    return String(langs[0]).toLowerCase().indexOf('zh') === 0 ? 'zh' : 'en';
  }

  function langTag() { return window.I18n.getLanguage() === 'zh' ? 'zh-CN' : 'en'; }

  function applyLanguage(lang) {
    window.I18n.setLanguage(lang); // sets <html lang> and every [data-i18n] text
    $('#lang-select').value = window.I18n.getLanguage();
    document.title = t('app.title');
    // Texts built by code are drawn again.
    renderUpdateNotice();
    if (state.loggedIn) refreshTab(state.tab, true);
    updateLogState();
    updateCurl();
    if (state.pgMeta) showPlaygroundMeta(state.pgMeta);
  }

  // ---------------------------------------------------------------------------------
  // Screens: loading, setup, login, app

  function showScreen(name) {
    $$('section[data-screen]').forEach(function (section) { section.hidden = section.dataset.screen !== name; });
    const inApp = name === 'app';
    $('#logout').hidden = !inApp;
    $('#change-password').hidden = !inApp;
    document.body.dataset.screen = name;
  }

  async function checkSession() {
    showScreen('loading');
    $('#loading-text').textContent = t('loading');
    $('#loading-retry').hidden = true;
    let info;
    try {
      info = await api('GET', 'session');
    } catch (err) {
      $('#loading-text').textContent = err.message;
      $('#loading-retry').hidden = false;
      return;
    }
    state.version = info.version || '';
    $('#app-version').textContent = state.version ? 'v' + state.version : '';
    if (info.logged_in) {
      state.csrf = info.csrf;
      enterApp();
    } else if (info.needs_setup) {
      showSetup(info.setup_allowed !== false);
    } else {
      showLogin();
    }
  }

  function showSetup(allowed) {
    showScreen('setup');
    $('#setup-form').hidden = !allowed;
    $('#setup-remote').hidden = allowed;
    if (allowed) $('#setup-password').focus();
  }

  function showLogin() {
    showScreen('login');
    $('#login-password').value = '';
    $('#login-password').focus();
  }

  const onSetup = submitForm({
    button: '#setup-submit',
    error: '#setup-error',
    read: function () {
      const password = $('#setup-password').value;
      if (password.length < 8) refuse(t('setup.tooShort'));
      return { password: password };
    },
    send: function (body) { return api('POST', 'setup', body, { keep401: true }); },
    done: function (data) {
      state.csrf = data.csrf;
      $('#setup-password').value = '';
      toast(t('setup.done'), 'ok');
      enterApp();
    },
    failed: function (err) {
      if (err.status === 409) setTimeout(checkSession, 1500); // someone set it meanwhile: sign in
      return err.message;
    },
  });

  const onLogin = submitForm({
    button: '#login-submit',
    error: '#login-error',
    read: function () {
      const password = $('#login-password').value;
      if (!password) refuse(t('login.empty'));
      return { password: password };
    },
    send: function (body) { return api('POST', 'login', body, { keep401: true }); },
    done: function (data) {
      state.csrf = data.csrf;
      $('#login-password').value = '';
      enterApp();
    },
    failed: function (err) {
      if (err.status === 401) return t('login.wrong');
      if (err.status === 429) waitBeforeLogin(err.retryAfter || 30); // shows its own countdown
      else if (err.status === 409) checkSession(); // no password yet after all
      else return err.message;
      return '';
    },
  });

  /** After too many attempts the server says how long to wait: count it down. */
  function waitBeforeLogin(seconds) {
    const error = $('#login-error');
    const button = $('#login-submit');
    let left = seconds;
    clearInterval(state.loginWaitTimer);
    button.disabled = true;
    error.dataset.retryAfter = String(seconds);
    const tick = function () {
      if (left <= 0) {
        clearInterval(state.loginWaitTimer);
        button.disabled = false;
        error.textContent = '';
        delete error.dataset.retryAfter;
        return;
      }
      error.textContent = t('login.tooMany', { s: left });
      left -= 1;
    };
    tick();
    state.loginWaitTimer = setInterval(tick, 1000);
  }

  function enterApp() {
    state.loggedIn = true;
    showScreen('app');
    const fromHash = location.hash.replace('#', '');
    const saved = storeGet(STORE.tab);
    selectTab(isTab(fromHash) ? fromHash : (isTab(saved) ? saved : 'dashboard'));
    // The dashboard's own status answer carries the update notice; other tabs ask once here.
    if (state.tab !== 'dashboard') api('GET', 'status').then(function (s) { showUpdateNotice(s.update); }).catch(reportError);
    startLogStream();
    startPolling();
  }

  /** The session ended (logout, expiry, password changed elsewhere): stop everything. */
  function signedOut(expired) {
    const wasIn = state.loggedIn;
    state.loggedIn = false;
    state.csrf = null;
    stopPolling();
    stopLogStream();
    stopOAuthPolling();
    if (state.pgAbort) state.pgAbort.abort();
    closeCreatedKey();
    closeOAuthBox();
    showLogin();
    if (expired && wasIn) toast(t('login.expired'), 'error');
  }

  async function onLogout() {
    try { await api('POST', 'logout', {}); } catch (err) { /* signed out either way */ }
    signedOut(false);
    toast(t('top.loggedOut'), 'ok');
  }

  // ---------------------------------------------------------------------------------
  // Change password dialog

  function openPasswordDialog() {
    $('#pw-current').value = '';
    $('#pw-new').value = '';
    $('#pw-error').textContent = '';
    $('#password-dialog').hidden = false;
    $('#pw-current').focus();
  }

  function closePasswordDialog() { $('#password-dialog').hidden = true; }

  const onChangePassword = submitForm({
    button: '#pw-submit',
    error: '#pw-error',
    read: function () {
      const next = $('#pw-new').value;
      if (next.length < 8) refuse(t('setup.tooShort'));
      return { current: $('#pw-current').value, new: next };
    },
    // 401 here means "current password wrong", not "signed out".
    send: function (body) { return api('POST', 'password', body, { keep401: true }); },
    done: function (data) {
      // The server ends all sessions and may hand this browser a fresh one.
      if (data && data.csrf) state.csrf = data.csrf;
      closePasswordDialog();
      toast(t('pw.done'), 'ok');
    },
    failed: function (err) { return err.status === 401 ? t('pw.wrong') : err.message; },
  });

  // ---------------------------------------------------------------------------------
  // Confirmation dialog: resolves true (yes) or false (no, Escape)

  function confirmAction(message) {
    return new Promise(function (resolve) {
      const dialog = $('#confirm-dialog');
      const yes = $('#confirm-yes');
      const no = $('#confirm-no');
      $('#confirm-text').textContent = message;
      dialog.hidden = false;
      yes.focus();
      const finish = function (answer) {
        dialog.hidden = true;
        yes.removeEventListener('click', onYes);
        no.removeEventListener('click', onNo);
        document.removeEventListener('keydown', onKey);
        resolve(answer);
      };
      const onYes = function () { finish(true); };
      const onNo = function () { finish(false); };
      const onKey = function (e) { if (e.key === 'Escape') finish(false); };
      yes.addEventListener('click', onYes);
      no.addEventListener('click', onNo);
      document.addEventListener('keydown', onKey);
    });
  }

  // ---------------------------------------------------------------------------------
  // Tabs and polling

  function isTab(name) { return Object.prototype.hasOwnProperty.call(SCREENS, name); }

  function selectTab(name) {
    if (!isTab(name)) name = 'dashboard';
    state.tab = name;
    storeSet(STORE.tab, name);
    $$('[data-tab]').forEach(function (button) {
      const active = button.dataset.tab === name;
      button.classList.toggle('active', active);
      button.setAttribute('aria-selected', active ? 'true' : 'false');
    });
    $$('[data-panel]').forEach(function (panel) { panel.hidden = panel.dataset.panel !== name; });
    if (location.hash !== '#' + name && window.history && history.replaceState) {
      history.replaceState(null, '', '#' + name);
    }
    refreshTab(name, false);
  }

  /**
   * Fetch what a tab shows and draw it; rejects when the fetch fails. `soft` (polling,
   * language change, after an action) must not wipe form input: load() answers nothing then
   * where a full load would rebuild a form.
   */
  async function loadScreen(name, soft) {
    const screen = SCREENS[name];
    const data = await screen.load(!!soft);
    if (data !== null && data !== undefined) screen.render(data);
  }

  /** loadScreen for the tab machinery: a failure becomes a toast. */
  function refreshTab(name, soft) { return loadScreen(name, soft).catch(reportError); }

  function startPolling() {
    stopPolling();
    const loop = function () {
      state.pollTimer = setTimeout(async function () {
        if (state.loggedIn && !document.hidden && SCREENS[state.tab].polled) {
          await refreshTab(state.tab, true);
        }
        if (state.loggedIn) loop();
      }, POLL_MS);
    };
    loop();
  }

  function stopPolling() {
    clearTimeout(state.pollTimer);
    state.pollTimer = null;
  }

  // ---------------------------------------------------------------------------------
  // Keyed table rows: update cells in place so buttons survive a refresh every 2 s

  function findRow(tbody, keyAttr, key) {
    for (let i = 0; i < tbody.children.length; i++) {
      if (tbody.children[i].getAttribute(keyAttr) === key) return tbody.children[i];
    }
    return null;
  }

  function syncRows(tbody, items, keyAttr, keyOf, build, update, emptyText) {
    const seen = {};
    items.forEach(function (item, index) {
      const key = String(keyOf(item));
      seen[key] = true;
      let row = findRow(tbody, keyAttr, key);
      if (!row) {
        row = build(item);
        row.setAttribute(keyAttr, key);
      }
      update(row, item);
      if (tbody.children[index] !== row) tbody.insertBefore(row, tbody.children[index] || null);
    });
    $$(':scope > tr', tbody).forEach(function (row) {
      if (!seen[row.getAttribute(keyAttr)]) row.remove();
    });
    if (!items.length) {
      const columns = tbody.parentNode.querySelectorAll('thead th').length || 1;
      tbody.appendChild(el('tr', { class: 'empty' }, el('td', { colspan: columns, text: emptyText || t('table.empty') })));
    }
  }

  /** A row of empty cells named by data-col, plus an actions cell with the given buttons. */
  function buildRow(columns, actions) {
    const row = el('tr');
    columns.forEach(function (col) { row.appendChild(el('td', { 'data-col': col })); });
    if (actions) {
      const cell = el('td', { 'data-col': 'actions', class: 'actions' });
      actions.forEach(function (a) {
        cell.appendChild(el('button', { type: 'button', class: 'small ' + (a.kind || ''), 'data-action': a.action, 'data-i18n': a.label, text: t(a.label) }));
      });
      row.appendChild(cell);
    }
    return row;
  }

  function setCell(row, col, value, className) {
    const cell = row.querySelector('[data-col="' + col + '"]');
    const text = value === null || value === undefined ? '' : String(value);
    if (cell.textContent !== text) cell.textContent = text;
    if (className !== undefined) cell.className = className;
    return cell;
  }

  function setBadge(row, col, text, kind, title) {
    const cell = row.querySelector('[data-col="' + col + '"]');
    cell.textContent = '';
    cell.appendChild(el('span', { class: 'badge ' + (kind || ''), title: title || null, text: text }));
    return cell;
  }

  /** Row actions use event delegation: one listener per table, rows come and go. */
  function onRowAction(tableSelector, keyAttr, handler) {
    $(tableSelector).addEventListener('click', function (event) {
      const button = event.target.closest('[data-action]');
      if (!button || button.disabled) return;
      const row = button.closest('[' + keyAttr + ']');
      if (!row) return;
      button.disabled = true;
      Promise.resolve(handler(button.dataset.action, row.getAttribute(keyAttr), button))
        .catch(reportError)
        .then(function () { button.disabled = false; });
    });
  }

  // ---------------------------------------------------------------------------------
  // Dashboard

  function setStat(name, text, raw) {
    const node = $('[data-stat="' + name + '"]');
    if (!node) return;
    node.textContent = text;
    node.dataset.value = raw === undefined ? text : String(raw);
  }

  function renderStatus(s) {
    const instances = s.instances || [];
    const running = instances.filter(function (i) { return i.running; }).length;
    const statusText = running ? t('state.running') + (instances.length > 1 ? ' (' + running + '/' + instances.length + ')' : '')
      : t('state.stopped');
    setStat('status', statusText, running ? 'running' : 'stopped');
    $('[data-stat="status"]').className = 'stat-value ' + (running ? 'ok-text' : 'bad-text');
    setStat('uptime', fmtDuration(s.uptime_s), s.uptime_s);
    setStat('version', s.version || state.version || '–', s.version || '');
    ['requests', 'errors', 'input_tokens', 'output_tokens'].forEach(function (k) { setStat(k, fmtInt(s[k]), s[k]); });
    $('[data-stat="errors"]').classList.toggle('bad-text', s.errors > 0);
    const latency = s.latency_ms || {};
    ['avg', 'p50', 'p95'].forEach(function (k) { setStat('latency_' + k, fmtMs(latency[k]), latency[k]); });
    renderCounts('#table-by-model', s.by_model);
    renderCounts('#table-by-provider', s.by_provider);
    renderCounts('#table-by-account', s.by_account);
    showUpdateNotice(s.update);
  }

  function renderCounts(tableSelector, counts) {
    const entries = Object.keys(counts || {}).map(function (k) { return [k, counts[k]]; });
    entries.sort(function (a, b) { return b[1] - a[1] || (a[0] < b[0] ? -1 : 1); });
    syncRows($(tableSelector + ' tbody'), entries, 'data-name', function (e) { return e[0]; },
      function () { return buildRow(['name', 'count']); },
      function (row, e) { setCell(row, 'name', e[0]); setCell(row, 'count', fmtInt(e[1]), 'num'); },
      t('dash.noRequests'));
  }

  // -- update notice: the status answer's "update" is null or {latest, current, url} --

  function showUpdateNotice(update) {
    state.update = update && update.latest ? update : null;
    renderUpdateNotice();
  }

  /** The banner above the tabs, unless this version's notice was dismissed. */
  function renderUpdateNotice() {
    const update = state.update;
    const box = $('#update-notice');
    box.hidden = !update || storeGet(STORE.updateDismissed) === String(update.latest);
    if (box.hidden) return;
    box.dataset.version = update.latest;
    $('#update-text').textContent = t('update.available', { latest: update.latest, current: update.current || state.version || '?' });
    const link = $('#update-link');
    const url = String(update.url || '');
    link.hidden = !/^https?:\/\//i.test(url); // only web addresses become links
    link.href = link.hidden ? '#' : url;
  }

  function dismissUpdateNotice() {
    if (state.update) storeSet(STORE.updateDismissed, String(state.update.latest));
    $('#update-notice').hidden = true;
  }

  // -- live log: last lines via GET, then new ones via server-sent events --

  async function startLogStream() {
    stopLogStream();
    try {
      const data = await api('GET', 'logs?n=200');
      state.logLines = (data.lines || []).slice(-MAX_LOG_LINES);
      renderLog();
    } catch (err) {
      reportError(err);
    }
    if (state.loggedIn) openLogSource();
  }

  function openLogSource() {
    if (!window.EventSource) return;
    const source = new EventSource('/admin/api/logs/stream');
    state.logSource = source;
    source.addEventListener('open', updateLogState);
    source.addEventListener('log', function (event) {
      try { appendLog(JSON.parse(event.data).line); } catch (e) { appendLog(String(event.data)); }
    });
    source.addEventListener('error', function () {
      updateLogState();
      // EventSource retries by itself unless the server refused (e.g. 401): then we retry,
      // slowly, and only while still signed in.
      if (source.readyState === EventSource.CLOSED && state.logSource === source) {
        state.logSource = null;
        clearTimeout(state.logRetryTimer);
        state.logRetryTimer = setTimeout(function () { if (state.loggedIn) openLogSource(); }, 5000);
      }
    });
    updateLogState();
  }

  function stopLogStream() {
    clearTimeout(state.logRetryTimer);
    if (state.logSource) state.logSource.close();
    state.logSource = null;
    updateLogState();
  }

  function updateLogState() {
    const badge = $('#log-state');
    const source = state.logSource;
    const live = source && source.readyState === 1;
    const connecting = source && source.readyState === 0;
    badge.textContent = live ? t('log.live') : connecting ? t('log.connecting') : t('log.offline');
    badge.className = 'badge ' + (live ? 'ok' : connecting ? 'warn' : 'muted');
    badge.dataset.state = live ? 'live' : connecting ? 'connecting' : 'offline';
  }

  function appendLog(line) {
    state.logLines.push(String(line));
    if (state.logLines.length > MAX_LOG_LINES) state.logLines.splice(0, state.logLines.length - MAX_LOG_LINES);
    // Many lines can arrive at once: draw at most once per frame.
    if (!state.logRenderQueued) {
      state.logRenderQueued = true;
      window.requestAnimationFrame(function () { state.logRenderQueued = false; renderLog(); });
    }
  }

  function renderLog() {
    const box = $('#log-tail');
    box.textContent = state.logLines.join('\n');
    if ($('#log-follow').checked) box.scrollTop = box.scrollHeight;
  }

  // ---------------------------------------------------------------------------------
  // Instances

  function renderInstances(data) {
    syncRows($('#instances-table tbody'), data.instances || [], 'data-instance', function (i) { return i.name; },
      function () {
        return buildRow(['name', 'url', 'address', 'state', 'requests', 'errors', 'in_flight'], [
          { action: 'start', label: 'action.start' },
          { action: 'stop', label: 'action.stop' },
          { action: 'remove', label: 'action.remove', kind: 'danger' }]);
      },
      updateInstanceRow, t('inst.none'));
  }

  function updateInstanceRow(row, inst) {
    setCell(row, 'name', inst.name);
    const urlCell = row.querySelector('[data-col="url"]');
    const link = urlCell.querySelector('a');
    if (!inst.url) urlCell.textContent = '–';
    else if (!link || link.getAttribute('href') !== inst.url) {
      urlCell.textContent = '';
      urlCell.appendChild(el('a', { href: inst.url, target: '_blank', rel: 'noopener', text: inst.url }));
    }
    setCell(row, 'address', hostPort(inst.host, inst.port));
    setBadge(row, 'state', inst.running ? t('state.running') : t('state.stopped'), inst.running ? 'ok' : 'muted');
    row.dataset.running = inst.running ? 'true' : 'false';
    setCell(row, 'requests', fmtInt(inst.requests), 'num');
    setCell(row, 'errors', fmtInt(inst.errors), 'num');
    setCell(row, 'in_flight', fmtInt(inst.in_flight), 'num');
    row.querySelector('[data-action="start"]').hidden = !!inst.running;
    row.querySelector('[data-action="stop"]').hidden = !inst.running;
  }

  function hostPort(host, port) {
    if (!host) return port === undefined ? '' : ':' + port;
    return (host.indexOf(':') >= 0 ? '[' + host + ']' : host) + ':' + port;
  }

  async function instanceAction(action, name) {
    if (action === 'remove') {
      if (!(await confirmAction(t('inst.confirmRemove', { name: name })))) return;
      await api('DELETE', 'instances/' + enc(name));
      toast(t('inst.removed', { name: name }), 'ok');
    } else {
      await api('POST', 'instances/' + enc(name) + '/' + action, {});
      toast(t(action === 'start' ? 'inst.started' : 'inst.stopped', { name: name }), 'ok');
    }
    await loadScreen('instances', true);
  }

  const onAddInstance = submitForm({
    button: '#instance-add',
    read: function () {
      const name = $('#instance-name').value.trim();
      const host = $('#instance-host').value.trim();
      const portText = $('#instance-port').value.trim();
      const port = Number(portText);
      if (!name) refuse(t('inst.needName'));
      if (!portText || !Number.isInteger(port) || port < 1 || port > 65535) refuse(t('inst.badPort'));
      return { name: name, host: host || '127.0.0.1', port: port };
    },
    send: function (body) { return api('POST', 'instances', body); },
    done: function (inst, body) {
      toast(t('inst.added', { name: inst.name || body.name, url: inst.url || '' }), 'ok');
      $('#instance-name').value = '';
      $('#instance-port').value = '';
      return loadScreen('instances', true);
    },
  });

  // ---------------------------------------------------------------------------------
  // Accounts and sign-in

  function renderAccounts(data) {
    syncRows($('#accounts-table tbody'), data.accounts || [], 'data-account', function (a) { return a.id; },
      function () {
        return buildRow(['id', 'label', 'auth_type', 'api_key', 'expires_at', 'status', 'in_flight', 'requests', 'errors'],
          [{ action: 'remove', label: 'action.remove', kind: 'danger' }]);
      },
      updateAccountRow, t('acc.none'));
  }

  function statusKind(status) {
    const s = String(status || '').toLowerCase();
    if (/^(ok|active|ready|healthy|valid)/.test(s)) return 'ok';
    if (/(error|expired|invalid|fail|disabled)/.test(s)) return 'bad';
    return 'warn';
  }

  function updateAccountRow(row, a) {
    setCell(row, 'id', a.id);
    setCell(row, 'label', a.label || '–');
    setCell(row, 'auth_type', a.auth_type || '–');
    setCell(row, 'api_key', a.api_key || '–', 'code');
    setCell(row, 'expires_at', fmtExpiry(a.expires_at));
    const cell = setBadge(row, 'status', a.status || '–', statusKind(a.status), a.message || null);
    if (a.message) cell.appendChild(el('div', { class: 'small muted', text: a.message }));
    setCell(row, 'in_flight', fmtInt(a.in_flight), 'num');
    setCell(row, 'requests', fmtInt(a.requests), 'num');
    setCell(row, 'errors', fmtInt(a.errors), 'num');
  }

  async function accountAction(action, id) {
    if (action !== 'remove') return;
    if (!(await confirmAction(t('acc.confirmRemove', { id: id })))) return;
    await api('DELETE', 'accounts/' + enc(id));
    toast(t('acc.removed', { id: id }), 'ok');
    await loadScreen('accounts', true);
  }

  const onAddAccountKey = submitForm({
    button: '#account-add',
    read: function () {
      const key = $('#account-key').value.trim();
      if (!key) refuse(t('acc.needKey'));
      return { api_key: key, add: $('#account-add-extra').checked };
    },
    send: function (body) { return api('POST', 'accounts', body); },
    done: function (data) {
      $('#account-key').value = '';
      toast(t('acc.added', { id: data.id }), 'ok');
      return loadScreen('accounts', true);
    },
  });

  async function onOAuthStart() {
    // Open the tab now, inside the click, or popup blockers stop it; point it at the
    // sign-in page once the server has made the URL.
    const tab = window.open('about:blank', '_blank');
    stopOAuthPolling();
    let data;
    try {
      data = await api('POST', 'accounts/oauth/start', { add: $('#account-add-extra').checked });
    } catch (err) {
      if (tab) tab.close();
      return reportError(err);
    }
    if (tab) {
      try { tab.opener = null; tab.location.href = data.url; } catch (e) { /* the link below still works */ }
    }
    $('#oauth-url').href = data.url;
    $('#oauth-url').textContent = data.url;
    $('#oauth-pasted').value = '';
    $('#oauth-box').hidden = false;
    showOAuthState({ state: 'waiting' });
    state.oauth = { session: data.session, timer: null };
    pollOAuth();
  }

  function pollOAuth() {
    const run = state.oauth;
    if (!run) return;
    run.timer = setTimeout(async function () {
      if (state.oauth !== run) return;
      try {
        const info = await api('GET', 'accounts/oauth/' + enc(run.session));
        if (state.oauth !== run) return;
        if (showOAuthState(info)) pollOAuth();
      } catch (err) {
        reportError(err);
        if (err.status !== 404 && err.status !== 401) pollOAuth();
        else stopOAuthPolling();
      }
    }, OAUTH_POLL_MS);
  }

  /** Show a sign-in state; true while it is still worth polling. */
  function showOAuthState(info) {
    const node = $('#oauth-state');
    const name = info.state || 'waiting';
    node.dataset.state = name;
    node.textContent = t('oauth.' + name) + (info.message ? ': ' + info.message : '');
    node.className = name === 'done' ? 'ok-text' : name === 'error' ? 'bad-text' : '';
    if (name === 'done') {
      toast(t('acc.added', { id: info.account || '' }), 'ok');
      stopOAuthPolling();
      refreshTab('accounts', true);
      return false;
    }
    if (name === 'error') {
      stopOAuthPolling();
      return false;
    }
    return true;
  }

  const onOAuthPaste = submitForm({
    button: '#oauth-submit',
    read: function () {
      const session = state.oauth ? state.oauth.session : $('#oauth-box').dataset.session;
      if (!session) refuse(); // no sign-in to finish
      const pasted = $('#oauth-pasted').value.trim();
      if (!pasted) refuse(t('acc.needPaste'));
      return { session: session, pasted: pasted };
    },
    send: function (input) { return api('POST', 'accounts/oauth/' + enc(input.session), { pasted: input.pasted }); },
    done: function (info) { showOAuthState(info); },
  });

  function stopOAuthPolling() {
    if (state.oauth) {
      clearTimeout(state.oauth.timer);
      // keep the session id so a pasted address can still finish an errored attempt
      $('#oauth-box').dataset.session = state.oauth.session;
    }
    state.oauth = null;
  }

  function closeOAuthBox() {
    stopOAuthPolling();
    delete $('#oauth-box').dataset.session;
    $('#oauth-box').hidden = true;
  }

  // ---------------------------------------------------------------------------------
  // Providers and model routes

  function renderProviders(data) {
    const providers = data.providers || [];
    providers.forEach(function (p) { if (p.name !== 'iflow' && p.configured === false) state.presets.add(p.name); });
    fillPresetSelect();
    syncRows($('#providers-table tbody'), providers, 'data-provider', function (p) { return p.name; },
      function () {
        return buildRow(['name', 'state', 'base_url', 'keys', 'notes'], [
          { action: 'default', label: 'prov.setDefault' },
          { action: 'remove', label: 'action.remove', kind: 'danger' }]);
      },
      updateProviderRow, t('table.empty'));
  }

  function updateProviderRow(row, p) {
    setCell(row, 'name', p.name);
    const cell = row.querySelector('[data-col="state"]');
    cell.textContent = '';
    if (p.default) cell.appendChild(el('span', { class: 'badge ok', text: t('prov.default') }));
    cell.appendChild(el('span', { class: 'badge ' + (p.enabled ? 'ok' : 'muted'), text: t(p.enabled ? 'prov.enabled' : (p.configured === false ? 'prov.isPreset' : 'prov.disabled')) }));
    setCell(row, 'base_url', p.base_url || '–', 'code small');
    setCell(row, 'keys', (p.keys || []).join(', ') || '–', 'code small');
    setCell(row, 'notes', p.notes || '', 'small muted');
    row.querySelector('[data-action="default"]').hidden = !!p.default || !p.enabled;
    // Only providers in the config can be removed (presets and iflow are built in).
    row.querySelector('[data-action="remove"]').hidden = p.name === 'iflow' || p.configured === false;
  }

  function fillPresetSelect() {
    const select = $('#provider-preset');
    const chosen = select.value;
    Array.prototype.slice.call(select.options, 1).forEach(function (o) { o.remove(); });
    Array.from(state.presets).sort().forEach(function (name) { select.appendChild(el('option', { value: name, text: name })); });
    select.value = state.presets.has(chosen) ? chosen : '';
  }

  async function providerAction(action, name) {
    if (action === 'default') {
      await api('PUT', 'config', { changes: { default_provider: name } });
      toast(t('prov.nowDefault', { name: name }), 'ok');
    } else if (action === 'remove') {
      if (!(await confirmAction(t('prov.confirmRemove', { name: name })))) return;
      await api('DELETE', 'providers/' + enc(name));
      toast(t('prov.removed', { name: name }), 'ok');
    }
    await loadScreen('providers', true);
  }

  const onAddProvider = submitForm({
    button: '#provider-add',
    read: function () {
      const preset = $('#provider-preset').value;
      const name = $('#provider-name').value.trim() || preset;
      if (!name) refuse(t('prov.needName'));
      const body = { name: name, default: $('#provider-default').checked };
      if (preset) body.preset = preset;
      const key = $('#provider-key').value.trim();
      if (key) body.api_key = key;
      const baseUrl = $('#provider-base-url').value.trim();
      if (baseUrl) body.base_url = baseUrl;
      const models = $('#provider-models').value.split(/[,\s]+/).filter(Boolean);
      if (models.length) body.models = models;
      return body;
    },
    send: function (body) { return api('POST', 'providers', body); },
    done: function (answer, body) {
      toast(t('prov.saved', { name: body.name }), 'ok');
      $('#provider-key').value = '';
      return loadScreen('providers', true);
    },
  });

  /** model_map / model_routes editors on the providers tab (they are plain config keys). */
  function renderRoutes(data) {
    state.config = data;
    const cfg = data.config || {};
    $('#routes-model-map').value = JSON.stringify(cfg.model_map || {}, null, 2);
    $('#routes-model-routes').value = JSON.stringify(cfg.model_routes || {}, null, 2);
    const editable = data.editable || [];
    $('#routes-card').hidden = editable.indexOf('model_map') < 0 && editable.indexOf('model_routes') < 0;
  }

  const onSaveRoutes = submitForm({
    button: '#routes-save',
    read: function () {
      const changes = {};
      [['model_map', '#routes-model-map'], ['model_routes', '#routes-model-routes']].forEach(function (field) {
        const input = $(field[1]);
        let value = null;
        try { value = JSON.parse(input.value || '{}'); } catch (e) { /* refused below */ }
        if (!value || typeof value !== 'object' || Array.isArray(value)) {
          input.setAttribute('aria-invalid', 'true');
          refuse(t('cfg.badJson', { key: field[0] }));
        }
        input.removeAttribute('aria-invalid');
        changes[field[0]] = value;
      });
      return { changes: changes };
    },
    send: function (body) { return api('PUT', 'config', body); },
    done: async function () {
      toast(t('cfg.saved'), 'ok');
      renderRoutes(await api('GET', 'config'));
    },
  });

  // ---------------------------------------------------------------------------------
  // Client API keys

  function renderKeys(data) {
    const keys = data.keys || [];
    state.keysExist = keys.length > 0;
    syncRows($('#keys-table tbody'), keys, 'data-key', function (k) { return k.id; },
      function () { return buildRow(['id', 'masked'], [{ action: 'revoke', label: 'keys.revoke', kind: 'danger' }]); },
      function (row, k) { setCell(row, 'id', k.id); setCell(row, 'masked', k.masked, 'code'); },
      t('keys.none'));
  }

  const onCreateKey = submitForm({
    button: '#key-create',
    send: function () { return api('POST', 'keys', {}); },
    done: function (data) {
      $('#key-created-value').value = data.key;
      $('#key-created').hidden = false;
      $('#key-created-value').select();
      return loadScreen('keys', true);
    },
  });

  async function keyAction(action, id) {
    if (action !== 'revoke') return;
    if (!(await confirmAction(t('keys.confirmRevoke', { id: id })))) return;
    await api('DELETE', 'keys/' + enc(id));
    toast(t('keys.revoked', { id: id }), 'ok');
    await loadScreen('keys', true);
  }

  function closeCreatedKey() {
    $('#key-created-value').value = ''; // the full key leaves the page for good
    $('#key-created').hidden = true;
  }

  /** Clipboard API needs a secure context (http://127.0.0.1 is one, a LAN address is not). */
  async function copyText(text) {
    try {
      if (navigator.clipboard && window.isSecureContext) {
        await navigator.clipboard.writeText(text);
        return toast(t('copy.done'), 'ok');
      }
    } catch (e) { /* fall back below */ }
    const area = el('textarea', { class: 'offscreen', readonly: true });
    area.value = text;
    document.body.appendChild(area);
    area.select();
    let ok = false;
    try { ok = document.execCommand('copy'); } catch (e) { ok = false; }
    area.remove();
    toast(t(ok ? 'copy.done' : 'copy.failed'), ok ? 'ok' : 'error');
  }

  // ---------------------------------------------------------------------------------
  // Config form: one field per editable key, typed by its current value

  function configKind(value) {
    if (typeof value === 'boolean') return 'bool';
    if (typeof value === 'number') return 'number';
    if (typeof value === 'string' || value === undefined) return 'string';
    return 'json'; // objects, lists, null
  }

  function renderConfig(data) {
    state.config = data;
    const form = $('#config-form');
    form.textContent = '';
    (data.editable || []).forEach(function (key) { form.appendChild(configField(key, (data.config || {})[key])); });
    filterConfig();
  }

  function configField(key, value) {
    const id = 'cfg-' + key;
    const kind = configKind(value);
    let input;
    if (kind === 'bool') {
      input = el('input', { type: 'checkbox', id: id });
      input.checked = value;
    } else if (kind === 'number') {
      input = el('input', { type: 'number', step: 'any', id: id });
      input.value = String(value);
    } else if (kind === 'string') {
      input = el('input', { type: 'text', id: id, autocomplete: 'off', spellcheck: 'false' });
      input.value = value === undefined ? '' : value;
    } else {
      const text = JSON.stringify(value, null, 2);
      input = el('textarea', { id: id, class: 'code', spellcheck: 'false', rows: Math.min(12, text.split('\n').length + 1) });
      input.value = text;
    }
    input.dataset.configKey = key;
    input.dataset.kind = kind;
    const hintKey = 'cfg.hint.' + key;
    const label = el('label', { for: id, class: 'config-key code', text: key });
    const hint = window.I18n.has(hintKey) ? el('div', { class: 'small muted', 'data-i18n': hintKey, text: t(hintKey) }) : null;
    const field = el('div', { class: 'config-field' + (kind === 'bool' ? ' is-bool' : '') + (kind === 'json' ? ' is-json' : ''), 'data-field': key });
    if (kind === 'bool') field.appendChild(el('div', { class: 'check' }, input, label));
    else { field.appendChild(label); field.appendChild(input); }
    if (hint) field.appendChild(hint);
    return field;
  }

  function readConfigInput(input) {
    const kind = input.dataset.kind;
    if (kind === 'bool') return input.checked;
    if (kind === 'string') return input.value;
    if (kind === 'number') {
      const n = Number(input.value);
      if (input.value.trim() === '' || !isFinite(n)) throw new Error(t('cfg.badNumber', { key: input.dataset.configKey }));
      return n;
    }
    try { return JSON.parse(input.value); } catch (e) { throw new Error(t('cfg.badJson', { key: input.dataset.configKey })); }
  }

  /** Only changed keys go to the server, so masked secrets are never written back. */
  function collectConfigChanges() {
    const original = (state.config && state.config.config) || {};
    const changes = {};
    $$('[data-config-key]', $('#config-form')).forEach(function (input) {
      const key = input.dataset.configKey;
      input.removeAttribute('aria-invalid');
      let value;
      try {
        value = readConfigInput(input);
      } catch (err) {
        input.setAttribute('aria-invalid', 'true');
        input.focus();
        throw err;
      }
      const before = original[key];
      if (before === undefined && value === '') return;
      if (JSON.stringify(value) !== JSON.stringify(before)) changes[key] = value;
    });
    return changes;
  }

  const onSaveConfig = submitForm({
    button: '#config-save',
    read: function () {
      const changes = collectConfigChanges();
      if (!Object.keys(changes).length) refuse(t('cfg.nothing'), 'info');
      const body = { changes: changes };
      const password = $('#config-password').value;
      if (!$('#config-confirm').hidden && password) body.password = password;
      return body;
    },
    send: function (body) { return api('PUT', 'config', body); },
    done: function (data, body) {
      $('#config-password').value = '';
      $('#config-confirm').hidden = true;
      renderConfig({ config: data.config, editable: (state.config && state.config.editable) || Object.keys(data.config || {}) });
      toast(t('cfg.savedKeys', { keys: Object.keys(body.changes).join(', ') }), 'ok');
    },
    failed: function (err) {
      if (err.code === 'password_required') {
        $('#config-confirm').hidden = false;  // keys that redirect credentials: ask for the password, then Save again
        $('#config-password').focus();
      }
      return errorText(err);
    },
  });

  function filterConfig() {
    const needle = $('#config-filter').value.trim().toLowerCase();
    $$('[data-field]', $('#config-form')).forEach(function (field) {
      field.hidden = needle !== '' && field.dataset.field.toLowerCase().indexOf(needle) < 0;
    });
  }

  // ---------------------------------------------------------------------------------
  // Playground: stream a chat completion or a Responses answer through /admin/api/playground

  /** Fill the model list; `keys` (null when unknown) tells whether curl needs a key. */
  function renderPlayground(data) {
    if (data.keys) state.keysExist = (data.keys.keys || []).length > 0;
    const select = $('#pg-model');
    const models = data.models.models || [];
    const wanted = select.value || storeGet(STORE.model);
    select.textContent = '';
    models.forEach(function (id) { select.appendChild(el('option', { value: id, text: id })); });
    if (!models.length) select.appendChild(el('option', { value: '', text: t('pg.noModels') }));
    if (wanted && models.indexOf(wanted) >= 0) select.value = wanted;
    updateCurl();
  }

  /**
   * The two APIs the playground speaks. Each knows its public path, the request body for the
   * form's text and how to read one streamed event into {text, thought, outputTokens, done}
   * (it throws when the event reports a failure).
   */
  const PG_APIS = {
    chat: {
      path: '/v1/chat/completions',
      body: function (model, system, prompt) {
        const messages = [];
        if (system) messages.push({ role: 'system', content: system });
        messages.push({ role: 'user', content: prompt });
        return { model: model, messages: messages, stream: true };
      },
      read: function (payload) {
        if (payload === '[DONE]') return { done: true };
        const chunk = parseEvent(payload);
        if (chunk.error) throw new Error(chunk.error.message || JSON.stringify(chunk.error));
        const delta = firstChoiceDelta(chunk);
        return {
          text: delta.content,
          thought: delta.reasoning_content || delta.reasoning,
          outputTokens: chunk.usage && chunk.usage.completion_tokens,
        };
      },
    },
    responses: {
      path: '/v1/responses',
      body: function (model, system, prompt) {
        const body = { model: model };
        if (system) body.instructions = system;
        body.input = prompt;
        body.stream = true;
        return body;
      },
      read: function (payload) {
        const event = parseEvent(payload);
        switch (event.type) {
          case 'response.output_text.delta': return { text: event.delta };
          case 'response.reasoning_summary_text.delta':
          case 'response.reasoning_text.delta': return { thought: event.delta };
          case 'response.completed':
          case 'response.incomplete': {
            const usage = event.response && event.response.usage;
            return { done: true, outputTokens: usage && usage.output_tokens };
          }
          case 'response.failed':
          case 'error': {
            const error = (event.response && event.response.error) || event.error || event;
            throw new Error(error.message || JSON.stringify(error));
          }
          default: return {};
        }
      },
    },
  };

  function parseEvent(payload) {
    try { return JSON.parse(payload) || {}; } catch (e) { return {}; }
  }

  function playgroundApiName() { return $('#pg-api').value === 'responses' ? 'responses' : 'chat'; }

  /** What Send asks for: the API, its public path and the body without the admin-only "api". */
  function playgroundRequest(model) {
    const name = playgroundApiName();
    const system = $('#pg-system').value.trim();
    return { name: name, api: PG_APIS[name], body: PG_APIS[name].body(model, system, $('#pg-prompt').value) };
  }

  function shellSingleQuote(text) { return "'" + text.replace(/'/g, "'\\''") + "'"; }

  /** The public-endpoint request equal to what Send does (curl -N: print as it streams). */
  function updateCurl() {
    const box = $('#pg-curl');
    if (!box) return;
    const request = playgroundRequest($('#pg-model').value || 'MODEL');
    const lines = ['curl -N ' + location.origin + request.api.path, "-H 'content-type: application/json'"];
    // Double quotes so the shell expands the variable.
    if (state.keysExist) lines.push('-H "authorization: Bearer $IFLOW2API_KEY"');
    lines.push('-d ' + shellSingleQuote(JSON.stringify(request.body)));
    box.textContent = lines.join(' \\\n  ');
  }

  /** Read an SSE body and call onData(dataString) per event; stops when onData returns true. */
  async function readSse(body, onData) {
    const reader = body.getReader();
    const decoder = new TextDecoder('utf-8');
    let buffer = '';
    let data = [];
    const dispatch = function () {
      if (!data.length) return false;
      const payload = data.join('\n');
      data = [];
      return onData(payload) === true;
    };
    for (;;) {
      const chunk = await reader.read();
      buffer += chunk.done ? decoder.decode() : decoder.decode(chunk.value, { stream: true });
      const lines = buffer.split(/\r\n|\r|\n/);
      buffer = chunk.done ? '' : lines.pop(); // keep a partial line for the next read
      for (let i = 0; i < lines.length; i++) {
        const line = lines[i];
        if (line === '') { if (dispatch()) { reader.cancel().catch(function () {}); return; } }
        else if (line.indexOf('data:') === 0) data.push(line.slice(line.charAt(5) === ' ' ? 6 : 5));
        // comments (":") and other fields (event:, id:) are not needed here
      }
      if (chunk.done) { dispatch(); return; }
    }
  }

  function firstChoiceDelta(chunk) {
    const choice = chunk && chunk.choices && chunk.choices[0];
    return (choice && (choice.delta || choice.message)) || {};
  }

  async function onSendPrompt(event) {
    if (event) event.preventDefault();
    if (state.pgAbort) return;
    const model = $('#pg-model').value;
    const prompt = $('#pg-prompt').value;
    if (!model) return toast(t('pg.needModel'), 'error');
    if (!prompt.trim()) return toast(t('pg.needPrompt'), 'error');
    storeSet(STORE.model, model);
    const request = playgroundRequest(model);

    const output = $('#pg-output');
    const reasoning = $('#pg-reasoning');
    output.textContent = '';
    reasoning.textContent = '';
    $('#pg-reasoning-box').hidden = true;
    output.dataset.state = 'streaming';
    output.classList.remove('bad-text');
    showPlaygroundMeta(function () { return t('pg.waiting'); });
    const controller = new AbortController();
    state.pgAbort = controller;
    $('#pg-send').disabled = true;
    $('#pg-stop').disabled = false;

    const started = performance.now();
    let firstAt = 0;
    let outputTokens;
    const onChunk = function (payload) {
      const part = request.api.read(payload);
      if (part.thought) { reasoning.textContent += part.thought; $('#pg-reasoning-box').hidden = false; }
      if (part.text) {
        if (!firstAt) firstAt = performance.now();
        output.textContent += part.text;
      }
      if (typeof part.outputTokens === 'number') outputTokens = part.outputTokens;
      return part.done === true;
    };

    try {
      const res = await fetch('/admin/api/playground',
        requestOptions('POST', Object.assign({ api: request.name }, request.body), controller.signal));
      if (!res.ok) {
        const err = errorFrom(res, await readJson(res));
        if (res.status === 401) signedOut(true);
        throw err;
      }
      if (res.body && res.body.getReader) {
        await readSse(res.body, onChunk);
      } else {
        // No streaming body support: parse the whole answer at the end.
        (await res.text()).split(/\r?\n/).forEach(function (line) {
          if (line.indexOf('data:') === 0) onChunk(line.slice(5).trim());
        });
      }
      output.dataset.state = 'done';
      const totalMs = performance.now() - started;
      const firstMs = firstAt && firstAt - started;
      showPlaygroundMeta(function () { return playgroundMeta(totalMs, firstMs, outputTokens); });
    } catch (err) {
      if (err && err.name === 'AbortError') {
        output.dataset.state = 'stopped';
        showPlaygroundMeta(function () { return t('pg.stopped'); });
      } else {
        output.dataset.state = 'error';
        output.classList.add('bad-text');
        if (!output.textContent) output.textContent = (err && err.message) || String(err);
        showPlaygroundMeta(function () { return t('pg.failed'); });
        reportError(err);
      }
    } finally {
      controller.abort(); // after an error mid-stream, stop reading the rest
      state.pgAbort = null;
      $('#pg-send').disabled = false;
      $('#pg-stop').disabled = true;
    }
  }

  /** The status line under Send, from a function of the language so it can be said again. */
  function showPlaygroundMeta(text) {
    state.pgMeta = text;
    $('#pg-meta').textContent = text();
  }

  function playgroundMeta(totalMs, firstMs, outputTokens) {
    const parts = [t('pg.total', { ms: Math.round(totalMs) })];
    if (firstMs) parts.push(t('pg.first', { ms: Math.round(firstMs) }));
    if (outputTokens !== undefined) parts.push(t('pg.tokens', { n: outputTokens }));
    return parts.join(' · ');
  }

  // ---------------------------------------------------------------------------------
  // The tabs: one entry per tab, in no other list. index.html has its button and panel.
  //   polled    refreshed every POLL_MS while shown
  //   load(soft)    fetch what it shows; answers null when there is nothing to draw
  //                 (soft: polling, a language change or after an action; must not wipe input)
  //   render(data)  draw what load fetched
  //   bind()        wire the tab's forms and buttons, once at start

  const SCREENS = {
    dashboard: {
      polled: true,
      load: function () { return api('GET', 'status'); },
      render: renderStatus,
      bind: function () {
        on('#log-clear', 'click', function () { state.logLines = []; renderLog(); });
      },
    },
    instances: {
      polled: true,
      load: function () { return api('GET', 'instances'); },
      render: renderInstances,
      bind: function () {
        on('#instance-form', 'submit', onAddInstance);
        onRowAction('#instances-table', 'data-instance', instanceAction);
      },
    },
    accounts: {
      polled: true,
      load: function () { return api('GET', 'accounts'); },
      render: renderAccounts,
      bind: function () {
        on('#account-key-form', 'submit', onAddAccountKey);
        onRowAction('#accounts-table', 'data-account', accountAction);
        on('#oauth-start', 'click', onOAuthStart);
        on('#oauth-paste-form', 'submit', onOAuthPaste);
        on('#oauth-cancel', 'click', closeOAuthBox);
      },
    },
    providers: {
      // soft: the list only, so unsaved route edits stay
      load: function (soft) {
        return Promise.all([api('GET', 'providers'), soft ? null : api('GET', 'config')])
          .then(function (both) { return { providers: both[0], config: both[1] }; });
      },
      render: function (data) {
        renderProviders(data.providers);
        if (data.config) renderRoutes(data.config);
      },
      bind: function () {
        on('#provider-form', 'submit', onAddProvider);
        on('#provider-preset', 'change', function (e) {
          if (!$('#provider-name').value.trim()) $('#provider-name').value = e.target.value;
        });
        onRowAction('#providers-table', 'data-provider', providerAction);
        on('#routes-save', 'click', onSaveRoutes);
      },
    },
    keys: {
      load: function () { return api('GET', 'keys'); },
      render: renderKeys,
      bind: function () {
        on('#key-create', 'click', onCreateKey);
        on('#key-copy', 'click', function () { copyText($('#key-created-value').value); });
        on('#key-created-close', 'click', closeCreatedKey);
        onRowAction('#keys-table', 'data-key', keyAction);
      },
    },
    config: {
      load: function (soft) { return soft ? null : api('GET', 'config'); }, // a full load rebuilds the form
      render: renderConfig,
      bind: function () {
        on('#config-save', 'click', onSaveConfig);
        on('#config-form', 'submit', onSaveConfig);
        on('#config-reload', 'click', function () {
          loadScreen('config').then(function () { toast(t('cfg.reloaded'), 'info'); }).catch(reportError);
        });
        on('#config-filter', 'input', filterConfig);
      },
    },
    playground: {
      load: async function (soft) {
        if (soft) return null;
        updateCurl();
        const keys = api('GET', 'keys').catch(function () { return null; }); // only for the curl hint
        return { models: await api('GET', 'models'), keys: await keys };
      },
      render: renderPlayground,
      bind: function () {
        on('#pg-form', 'submit', onSendPrompt);
        on('#pg-stop', 'click', function () { if (state.pgAbort) state.pgAbort.abort(); });
        on('#pg-models-reload', 'click', function () { refreshTab('playground'); });
        $('#pg-api').value = storeGet(STORE.pgApi) === 'responses' ? 'responses' : 'chat';
        on('#pg-api', 'change', function (e) { storeSet(STORE.pgApi, e.target.value); });
        ['#pg-api', '#pg-model', '#pg-prompt', '#pg-system'].forEach(function (sel) {
          on(sel, 'input', updateCurl);
          on(sel, 'change', updateCurl);
        });
        on('#pg-prompt', 'keydown', function (e) {
          if (e.key === 'Enter' && (e.ctrlKey || e.metaKey)) onSendPrompt(e);
        });
        on('#pg-curl-copy', 'click', function () { copyText($('#pg-curl').textContent); });
      },
    },
  };

  // ---------------------------------------------------------------------------------
  // Wiring: the page around the tabs; each tab wires its own in SCREENS

  function on(selector, type, handler) { $(selector).addEventListener(type, handler); }

  function bindEvents() {
    on('#lang-select', 'change', function (e) {
      storeSet(STORE.lang, e.target.value);
      applyLanguage(e.target.value);
    });
    on('#theme-select', 'change', function (e) {
      storeSet(STORE.theme, e.target.value);
      applyTheme();
    });
    if (darkQuery) {
      const onSystemChange = function () { if (themePreference() === 'system') applyTheme(); };
      if (darkQuery.addEventListener) darkQuery.addEventListener('change', onSystemChange);
      else if (darkQuery.addListener) darkQuery.addListener(onSystemChange); // older Safari
    }

    on('#loading-retry', 'click', checkSession);
    on('#setup-form', 'submit', onSetup);
    on('#setup-show', 'change', function (e) { $('#setup-password').type = e.target.checked ? 'text' : 'password'; });
    on('#login-form', 'submit', onLogin);
    on('#logout', 'click', onLogout);
    on('#change-password', 'click', openPasswordDialog);
    on('#password-form', 'submit', onChangePassword);
    on('#pw-cancel', 'click', closePasswordDialog);
    on('#password-dialog', 'keydown', function (e) { if (e.key === 'Escape') closePasswordDialog(); });
    on('#update-dismiss', 'click', dismissUpdateNotice);

    on('#tabs', 'click', function (e) {
      const button = e.target.closest('[data-tab]');
      if (button) selectTab(button.dataset.tab);
    });
    window.addEventListener('hashchange', function () {
      const name = location.hash.replace('#', '');
      if (state.loggedIn && isTab(name) && name !== state.tab) selectTab(name);
    });
    document.addEventListener('visibilitychange', function () {
      if (!document.hidden && state.loggedIn && SCREENS[state.tab].polled) refreshTab(state.tab, true);
    });

    Object.keys(SCREENS).forEach(function (name) { SCREENS[name].bind(); });
  }

  function start() {
    applyTheme();
    applyLanguage(initialLanguage());
    bindEvents();
    checkSession();
  }

  // Scripts are deferred, so the document is parsed by now.
  start();
})();
