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
  const STORE = { theme: 'iflow2api.theme', lang: 'iflow2api.lang', tab: 'iflow2api.tab', model: 'iflow2api.model' };
  const TABS = ['dashboard', 'instances', 'accounts', 'providers', 'keys', 'config', 'playground'];
  const POLLED_TABS = { dashboard: true, instances: true, accounts: true };

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
    lastStatus: null,
    presets: new Set(),        // provider preset names seen (unconfigured providers are presets)
    config: null,              // last GET /admin/api/config answer
    keysExist: false,          // any client API key? then curl needs an Authorization header
    oauth: null,               // {session, timer} while a browser sign-in runs
    pgAbort: null,             // AbortController of the running playground request
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

  function reportError(err) {
    if (err && err.silent) return;
    toast((err && err.message) || String(err), 'error');
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
    // Texts built by code are redrawn from the data last seen.
    if (state.lastStatus) renderStatus(state.lastStatus);
    if (state.loggedIn) refreshTab(state.tab, { soft: true });
    updateLogState();
    updateCurl();
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

  async function onSetup(event) {
    event.preventDefault();
    const password = $('#setup-password').value;
    const error = $('#setup-error');
    error.textContent = '';
    if (password.length < 8) {
      error.textContent = t('setup.tooShort');
      return;
    }
    $('#setup-submit').disabled = true;
    try {
      const data = await api('POST', 'setup', { password: password }, { keep401: true });
      state.csrf = data.csrf;
      $('#setup-password').value = '';
      toast(t('setup.done'), 'ok');
      enterApp();
    } catch (err) {
      error.textContent = err.message;
      if (err.status === 409) setTimeout(checkSession, 1500); // someone set it meanwhile: sign in
    } finally {
      $('#setup-submit').disabled = false;
    }
  }

  async function onLogin(event) {
    event.preventDefault();
    const error = $('#login-error');
    error.textContent = '';
    const password = $('#login-password').value;
    if (!password) {
      error.textContent = t('login.empty');
      return;
    }
    $('#login-submit').disabled = true;
    let waiting = false;
    try {
      const data = await api('POST', 'login', { password: password }, { keep401: true });
      state.csrf = data.csrf;
      $('#login-password').value = '';
      enterApp();
    } catch (err) {
      if (err.status === 429) {
        waiting = true;
        waitBeforeLogin(err.retryAfter || 30);
      } else if (err.status === 401) {
        error.textContent = t('login.wrong');
      } else if (err.status === 409) {
        checkSession(); // no password yet after all
      } else {
        error.textContent = err.message;
      }
    } finally {
      if (!waiting) $('#login-submit').disabled = false;
    }
  }

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
    selectTab(TABS.indexOf(fromHash) >= 0 ? fromHash : (TABS.indexOf(saved) >= 0 ? saved : 'dashboard'));
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

  async function onChangePassword(event) {
    event.preventDefault();
    const error = $('#pw-error');
    const current = $('#pw-current').value;
    const next = $('#pw-new').value;
    error.textContent = '';
    if (next.length < 8) {
      error.textContent = t('setup.tooShort');
      return;
    }
    $('#pw-submit').disabled = true;
    try {
      // 401 here means "current password wrong", not "signed out".
      const data = await api('POST', 'password', { current: current, new: next }, { keep401: true });
      // The server ends all sessions and may hand this browser a fresh one.
      if (data && data.csrf) state.csrf = data.csrf;
      closePasswordDialog();
      toast(t('pw.done'), 'ok');
    } catch (err) {
      error.textContent = err.status === 401 ? t('pw.wrong') : err.message;
    } finally {
      $('#pw-submit').disabled = false;
    }
  }

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

  function selectTab(name) {
    if (TABS.indexOf(name) < 0) name = 'dashboard';
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
    refreshTab(name, {});
  }

  /** Load what a tab shows. `soft` (language change, polling) must not wipe form input. */
  function refreshTab(name, opts) {
    const soft = opts && opts.soft;
    const loaders = {
      dashboard: refreshStatus,
      instances: refreshInstances,
      accounts: refreshAccounts,
      providers: function () { return soft ? refreshProviders() : Promise.all([refreshProviders(), loadRoutes()]); },
      keys: refreshKeys,
      config: function () { return soft ? Promise.resolve() : loadConfig(); },
      playground: function () { return soft ? Promise.resolve() : loadPlayground(); },
    };
    return Promise.resolve(loaders[name] && loaders[name]()).catch(reportError);
  }

  function startPolling() {
    stopPolling();
    const loop = function () {
      state.pollTimer = setTimeout(async function () {
        if (state.loggedIn && !document.hidden && POLLED_TABS[state.tab]) {
          await refreshTab(state.tab, { soft: true });
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

  async function refreshStatus() {
    const status = await api('GET', 'status');
    state.lastStatus = status;
    renderStatus(status);
  }

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
  }

  function renderCounts(tableSelector, counts) {
    const entries = Object.keys(counts || {}).map(function (k) { return [k, counts[k]]; });
    entries.sort(function (a, b) { return b[1] - a[1] || (a[0] < b[0] ? -1 : 1); });
    syncRows($(tableSelector + ' tbody'), entries, 'data-name', function (e) { return e[0]; },
      function () { return buildRow(['name', 'count']); },
      function (row, e) { setCell(row, 'name', e[0]); setCell(row, 'count', fmtInt(e[1]), 'num'); },
      t('dash.noRequests'));
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

  async function refreshInstances() {
    const data = await api('GET', 'instances');
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
    await refreshInstances();
  }

  async function onAddInstance(event) {
    event.preventDefault();
    const name = $('#instance-name').value.trim();
    const host = $('#instance-host').value.trim();
    const portText = $('#instance-port').value.trim();
    const port = Number(portText);
    if (!name) return toast(t('inst.needName'), 'error');
    if (!portText || !Number.isInteger(port) || port < 1 || port > 65535) return toast(t('inst.badPort'), 'error');
    $('#instance-add').disabled = true;
    try {
      const inst = await api('POST', 'instances', { name: name, host: host || '127.0.0.1', port: port });
      toast(t('inst.added', { name: inst.name || name, url: inst.url || '' }), 'ok');
      $('#instance-name').value = '';
      $('#instance-port').value = '';
      await refreshInstances();
    } catch (err) {
      reportError(err);
    } finally {
      $('#instance-add').disabled = false;
    }
  }

  // ---------------------------------------------------------------------------------
  // Accounts and sign-in

  async function refreshAccounts() {
    const data = await api('GET', 'accounts');
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
    await refreshAccounts();
  }

  async function onAddAccountKey(event) {
    event.preventDefault();
    const key = $('#account-key').value.trim();
    if (!key) return toast(t('acc.needKey'), 'error');
    $('#account-add').disabled = true;
    try {
      const data = await api('POST', 'accounts', { api_key: key, add: $('#account-add-extra').checked });
      $('#account-key').value = '';
      toast(t('acc.added', { id: data.id }), 'ok');
      await refreshAccounts();
    } catch (err) {
      reportError(err);
    } finally {
      $('#account-add').disabled = false;
    }
  }

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
      refreshAccounts().catch(reportError);
      return false;
    }
    if (name === 'error') {
      stopOAuthPolling();
      return false;
    }
    return true;
  }

  async function onOAuthPaste(event) {
    event.preventDefault();
    const run = state.oauth;
    const pasted = $('#oauth-pasted').value.trim();
    if (!run && !$('#oauth-box').dataset.session) return;
    if (!pasted) return toast(t('acc.needPaste'), 'error');
    $('#oauth-submit').disabled = true;
    try {
      const session = run ? run.session : $('#oauth-box').dataset.session;
      const info = await api('POST', 'accounts/oauth/' + enc(session), { pasted: pasted });
      showOAuthState(info);
    } catch (err) {
      reportError(err);
    } finally {
      $('#oauth-submit').disabled = false;
    }
  }

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

  async function refreshProviders() {
    const data = await api('GET', 'providers');
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
    await refreshProviders();
  }

  async function onAddProvider(event) {
    event.preventDefault();
    const preset = $('#provider-preset').value;
    const name = $('#provider-name').value.trim() || preset;
    if (!name) return toast(t('prov.needName'), 'error');
    const body = { name: name, default: $('#provider-default').checked };
    if (preset) body.preset = preset;
    const key = $('#provider-key').value.trim();
    if (key) body.api_key = key;
    const baseUrl = $('#provider-base-url').value.trim();
    if (baseUrl) body.base_url = baseUrl;
    const models = $('#provider-models').value.split(/[,\s]+/).filter(Boolean);
    if (models.length) body.models = models;
    $('#provider-add').disabled = true;
    try {
      await api('POST', 'providers', body);
      toast(t('prov.saved', { name: name }), 'ok');
      $('#provider-key').value = '';
      await refreshProviders();
    } catch (err) {
      reportError(err);
    } finally {
      $('#provider-add').disabled = false;
    }
  }

  /** model_map / model_routes editors on the providers tab (they are plain config keys). */
  async function loadRoutes() {
    const data = await api('GET', 'config');
    state.config = data;
    const cfg = data.config || {};
    $('#routes-model-map').value = JSON.stringify(cfg.model_map || {}, null, 2);
    $('#routes-model-routes').value = JSON.stringify(cfg.model_routes || {}, null, 2);
    const editable = data.editable || [];
    $('#routes-card').hidden = editable.indexOf('model_map') < 0 && editable.indexOf('model_routes') < 0;
  }

  async function onSaveRoutes() {
    const changes = {};
    const fields = [['model_map', '#routes-model-map'], ['model_routes', '#routes-model-routes']];
    for (let i = 0; i < fields.length; i++) {
      const input = $(fields[i][1]);
      try {
        const value = JSON.parse(input.value || '{}');
        if (!value || typeof value !== 'object' || Array.isArray(value)) throw new Error('not an object');
        changes[fields[i][0]] = value;
        input.removeAttribute('aria-invalid');
      } catch (e) {
        input.setAttribute('aria-invalid', 'true');
        return toast(t('cfg.badJson', { key: fields[i][0] }), 'error');
      }
    }
    $('#routes-save').disabled = true;
    try {
      await api('PUT', 'config', { changes: changes });
      toast(t('cfg.saved'), 'ok');
      await loadRoutes();
    } catch (err) {
      reportError(err);
    } finally {
      $('#routes-save').disabled = false;
    }
  }

  // ---------------------------------------------------------------------------------
  // Client API keys

  async function refreshKeys() {
    const data = await api('GET', 'keys');
    const keys = data.keys || [];
    state.keysExist = keys.length > 0;
    syncRows($('#keys-table tbody'), keys, 'data-key', function (k) { return k.id; },
      function () { return buildRow(['id', 'masked'], [{ action: 'revoke', label: 'keys.revoke', kind: 'danger' }]); },
      function (row, k) { setCell(row, 'id', k.id); setCell(row, 'masked', k.masked, 'code'); },
      t('keys.none'));
  }

  async function onCreateKey() {
    $('#key-create').disabled = true;
    try {
      const data = await api('POST', 'keys', {});
      $('#key-created-value').value = data.key;
      $('#key-created').hidden = false;
      $('#key-created-value').select();
      await refreshKeys();
    } catch (err) {
      reportError(err);
    } finally {
      $('#key-create').disabled = false;
    }
  }

  async function keyAction(action, id) {
    if (action !== 'revoke') return;
    if (!(await confirmAction(t('keys.confirmRevoke', { id: id })))) return;
    await api('DELETE', 'keys/' + enc(id));
    toast(t('keys.revoked', { id: id }), 'ok');
    await refreshKeys();
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

  async function loadConfig() {
    const data = await api('GET', 'config');
    state.config = data;
    renderConfig(data);
  }

  function configKind(value) {
    if (typeof value === 'boolean') return 'bool';
    if (typeof value === 'number') return 'number';
    if (typeof value === 'string' || value === undefined) return 'string';
    return 'json'; // objects, lists, null
  }

  function renderConfig(data) {
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

  async function onSaveConfig() {
    let changes;
    try { changes = collectConfigChanges(); } catch (err) { return toast(err.message, 'error'); }
    if (!Object.keys(changes).length) return toast(t('cfg.nothing'), 'info');
    $('#config-save').disabled = true;
    const confirm = $('#config-confirm');
    const password = $('#config-password');
    try {
      const body = { changes: changes };
      if (!confirm.hidden && password.value) body.password = password.value;
      const data = await api('PUT', 'config', body);
      password.value = '';
      confirm.hidden = true;
      state.config = { config: data.config, editable: (state.config && state.config.editable) || Object.keys(data.config || {}) };
      renderConfig(state.config);
      toast(t('cfg.savedKeys', { keys: Object.keys(changes).join(', ') }), 'ok');
    } catch (err) {
      if (err.code === 'password_required') {
        confirm.hidden = false;  // keys that redirect credentials: ask for the password, then Save again
        password.focus();
      }
      reportError(err);
    } finally {
      $('#config-save').disabled = false;
    }
  }

  function filterConfig() {
    const needle = $('#config-filter').value.trim().toLowerCase();
    $$('[data-field]', $('#config-form')).forEach(function (field) {
      field.hidden = needle !== '' && field.dataset.field.toLowerCase().indexOf(needle) < 0;
    });
  }

  // ---------------------------------------------------------------------------------
  // Playground: stream a chat completion through /admin/api/playground

  async function loadPlayground() {
    updateCurl();
    // Whether the curl line needs a key; failure here only affects that hint.
    api('GET', 'keys').then(function (d) { state.keysExist = (d.keys || []).length > 0; updateCurl(); }).catch(function () {});
    await loadModels();
  }

  async function loadModels() {
    const select = $('#pg-model');
    const data = await api('GET', 'models');
    const models = data.models || [];
    const wanted = select.value || storeGet(STORE.model);
    select.textContent = '';
    models.forEach(function (id) { select.appendChild(el('option', { value: id, text: id })); });
    if (!models.length) select.appendChild(el('option', { value: '', text: t('pg.noModels') }));
    if (wanted && models.indexOf(wanted) >= 0) select.value = wanted;
    updateCurl();
  }

  function playgroundMessages() {
    const messages = [];
    const system = $('#pg-system').value.trim();
    if (system) messages.push({ role: 'system', content: system });
    messages.push({ role: 'user', content: $('#pg-prompt').value });
    return messages;
  }

  function shellSingleQuote(text) { return "'" + text.replace(/'/g, "'\\''") + "'"; }

  /** The public-endpoint request equal to what Send does (curl -N: print as it streams). */
  function updateCurl() {
    const box = $('#pg-curl');
    if (!box) return;
    const body = JSON.stringify({ model: $('#pg-model').value || 'MODEL', messages: playgroundMessages(), stream: true });
    const lines = ['curl -N ' + location.origin + '/v1/chat/completions', "-H 'content-type: application/json'"];
    // Double quotes so the shell expands the variable.
    if (state.keysExist) lines.push('-H "authorization: Bearer $IFLOW2API_KEY"');
    lines.push('-d ' + shellSingleQuote(body));
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

    const output = $('#pg-output');
    const reasoning = $('#pg-reasoning');
    output.textContent = '';
    reasoning.textContent = '';
    $('#pg-reasoning-box').hidden = true;
    output.dataset.state = 'streaming';
    output.classList.remove('bad-text');
    $('#pg-meta').textContent = t('pg.waiting');
    const controller = new AbortController();
    state.pgAbort = controller;
    $('#pg-send').disabled = true;
    $('#pg-stop').disabled = false;

    const started = performance.now();
    let firstAt = 0;
    let usage = null;
    const onChunk = function (payload) {
      if (payload === '[DONE]') return true;
      let chunk;
      try { chunk = JSON.parse(payload); } catch (e) { return false; }
      if (chunk.error) throw new Error(chunk.error.message || JSON.stringify(chunk.error));
      const delta = firstChoiceDelta(chunk);
      const thought = delta.reasoning_content || delta.reasoning;
      if (thought) { reasoning.textContent += thought; $('#pg-reasoning-box').hidden = false; }
      if (delta.content) {
        if (!firstAt) firstAt = performance.now();
        output.textContent += delta.content;
      }
      if (chunk.usage) usage = chunk.usage;
      return false;
    };

    try {
      const res = await fetch('/admin/api/playground',
        requestOptions('POST', { model: model, messages: playgroundMessages(), stream: true }, controller.signal));
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
      $('#pg-meta').textContent = playgroundMeta(started, firstAt, usage);
    } catch (err) {
      if (err && err.name === 'AbortError') {
        output.dataset.state = 'stopped';
        $('#pg-meta').textContent = t('pg.stopped');
      } else {
        output.dataset.state = 'error';
        output.classList.add('bad-text');
        if (!output.textContent) output.textContent = (err && err.message) || String(err);
        $('#pg-meta').textContent = t('pg.failed');
        reportError(err);
      }
    } finally {
      controller.abort(); // after an error mid-stream, stop reading the rest
      state.pgAbort = null;
      $('#pg-send').disabled = false;
      $('#pg-stop').disabled = true;
    }
  }

  function playgroundMeta(started, firstAt, usage) {
    const parts = [t('pg.total', { ms: Math.round(performance.now() - started) })];
    if (firstAt) parts.push(t('pg.first', { ms: Math.round(firstAt - started) }));
    if (usage && usage.completion_tokens !== undefined) parts.push(t('pg.tokens', { n: usage.completion_tokens }));
    return parts.join(' · ');
  }

  // ---------------------------------------------------------------------------------
  // Wiring

  function bindEvents() {
    $('#lang-select').addEventListener('change', function (e) {
      storeSet(STORE.lang, e.target.value);
      applyLanguage(e.target.value);
    });
    $('#theme-select').addEventListener('change', function (e) {
      storeSet(STORE.theme, e.target.value);
      applyTheme();
    });
    if (darkQuery) {
      const onSystemChange = function () { if (themePreference() === 'system') applyTheme(); };
      if (darkQuery.addEventListener) darkQuery.addEventListener('change', onSystemChange);
      else if (darkQuery.addListener) darkQuery.addListener(onSystemChange); // older Safari
    }

    $('#loading-retry').addEventListener('click', checkSession);
    $('#setup-form').addEventListener('submit', onSetup);
    $('#setup-show').addEventListener('change', function (e) { $('#setup-password').type = e.target.checked ? 'text' : 'password'; });
    $('#login-form').addEventListener('submit', onLogin);
    $('#logout').addEventListener('click', onLogout);
    $('#change-password').addEventListener('click', openPasswordDialog);
    $('#password-form').addEventListener('submit', onChangePassword);
    $('#pw-cancel').addEventListener('click', closePasswordDialog);
    $('#password-dialog').addEventListener('keydown', function (e) { if (e.key === 'Escape') closePasswordDialog(); });

    $('#tabs').addEventListener('click', function (e) {
      const button = e.target.closest('[data-tab]');
      if (button) selectTab(button.dataset.tab);
    });
    window.addEventListener('hashchange', function () {
      const name = location.hash.replace('#', '');
      if (state.loggedIn && TABS.indexOf(name) >= 0 && name !== state.tab) selectTab(name);
    });
    document.addEventListener('visibilitychange', function () {
      if (!document.hidden && state.loggedIn && POLLED_TABS[state.tab]) refreshTab(state.tab, { soft: true });
    });

    $('#log-clear').addEventListener('click', function () { state.logLines = []; renderLog(); });

    $('#instance-form').addEventListener('submit', onAddInstance);
    onRowAction('#instances-table', 'data-instance', instanceAction);

    $('#account-key-form').addEventListener('submit', onAddAccountKey);
    onRowAction('#accounts-table', 'data-account', accountAction);
    $('#oauth-start').addEventListener('click', onOAuthStart);
    $('#oauth-paste-form').addEventListener('submit', onOAuthPaste);
    $('#oauth-cancel').addEventListener('click', closeOAuthBox);

    $('#provider-form').addEventListener('submit', onAddProvider);
    $('#provider-preset').addEventListener('change', function (e) {
      if (!$('#provider-name').value.trim()) $('#provider-name').value = e.target.value;
    });
    onRowAction('#providers-table', 'data-provider', providerAction);
    $('#routes-save').addEventListener('click', onSaveRoutes);

    $('#key-create').addEventListener('click', onCreateKey);
    $('#key-copy').addEventListener('click', function () { copyText($('#key-created-value').value); });
    $('#key-created-close').addEventListener('click', closeCreatedKey);
    onRowAction('#keys-table', 'data-key', keyAction);

    $('#config-save').addEventListener('click', onSaveConfig);
    $('#config-reload').addEventListener('click', function () { loadConfig().then(function () { toast(t('cfg.reloaded'), 'info'); }).catch(reportError); });
    $('#config-filter').addEventListener('input', filterConfig);
    $('#config-form').addEventListener('submit', function (e) { e.preventDefault(); onSaveConfig(); });

    $('#pg-form').addEventListener('submit', onSendPrompt);
    $('#pg-stop').addEventListener('click', function () { if (state.pgAbort) state.pgAbort.abort(); });
    $('#pg-models-reload').addEventListener('click', function () { loadModels().catch(reportError); });
    ['#pg-model', '#pg-prompt', '#pg-system'].forEach(function (sel) {
      $(sel).addEventListener('input', updateCurl);
      $(sel).addEventListener('change', updateCurl);
    });
    $('#pg-prompt').addEventListener('keydown', function (e) {
      if (e.key === 'Enter' && (e.ctrlKey || e.metaKey)) onSendPrompt(e);
    });
    $('#pg-curl-copy').addEventListener('click', function () { copyText($('#pg-curl').textContent); });
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
