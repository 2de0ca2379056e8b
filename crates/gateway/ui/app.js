// The sitegate dashboard: logs in, shows the sites with the health of each link and the
// user's tasks across sites, with live progress for running ones.
//
// Plain script, no framework and no build step: it is embedded in the binary as written.
// The page's Content-Security-Policy forbids inline code and HTML-from-strings (Trusted
// Types), so everything is built with createElement/textContent; text from the API (task
// names, error messages) is only ever shown as text.
(() => {
  'use strict';

  // The token lives for the tab only: closing it forgets the session, and other tabs or
  // later visits never see it.
  const TOKEN_KEY = 'sitegate.token';
  const REFRESH_MS = 2000;
  // A task's event stream holds one HTTP/1.1 connection for as long as the task runs, and a
  // browser opens at most six to one origin; the rest stay free for the refreshes and the
  // buttons. Running tasks beyond these follow the two-second refresh instead.
  const MAX_STREAMS = 3;
  // After a stream fails or ends early, the refresh keeps the row current; the stream is
  // tried again only after this pause, so a down peer is not asked in a tight loop.
  const STREAM_RETRY_MS = 5000;
  // Whether fetch() can hand over a body as it arrives; without it, task changes are
  // followed with blocking reads instead of the event stream.
  const CAN_STREAM = typeof ReadableStream === 'function' && 'body' in Response.prototype;

  const $ = (id) => document.getElementById(id);

  /** A failed call: the HTTP status, the error envelope and the answer's operation ID. */
  class ApiFailure extends Error {
    constructor(status, envelope, operationId) {
      super(`${envelope.code}: ${envelope.msg}`);
      this.status = status;
      this.code = envelope.code;
      this.msg = envelope.msg;
      this.operationId = operationId;
    }
  }

  // Everything the page knows, dropped as a whole at logout.
  let state = freshState();

  function freshState() {
    return {
      /** `${site}/${id}` -> { task, events (stream events seen), stale, row } */
      tasks: new Map(),
      /** `${site}/${id}` -> AbortController of the task's stream (or blocking-read loop). */
      watchers: new Map(),
      /** `${site}/${id}` -> time before which its stream is not retried. */
      retryAt: new Map(),
      /** Sites the session is extended to, plus the local one. */
      sessionSites: new Set(),
      refreshTimer: null,
      refreshing: false,
      refreshAgain: false,
    };
  }

  const token = () => sessionStorage.getItem(TOKEN_KEY);

  async function failureOf(response) {
    const operationId = response.headers.get('operationID');
    let envelope = null;
    try {
      envelope = await response.json();
    } catch (_) {
      // Not JSON (a proxy's page, say): described by its status below.
    }
    if (!envelope || typeof envelope.code !== 'string') {
      envelope = { code: `HTTP ${response.status}`, msg: response.statusText || 'unexpected answer' };
    }
    return new ApiFailure(response.status, envelope, operationId);
  }

  /** Sends a call to this site's API; the answer's JSON, or an ApiFailure. */
  async function call(method, path, body, options = {}) {
    const headers = { Accept: options.accept || 'application/json' };
    const t = token();
    if (t) headers['X-VCAV-Auth'] = t;
    if (body !== undefined) headers['Content-Type'] = 'application/json';
    let response;
    try {
      response = await fetch(path, {
        method,
        headers,
        body: body === undefined ? undefined : JSON.stringify(body),
        cache: 'no-store',
        signal: options.signal,
      });
    } catch (e) {
      if (e.name === 'AbortError') throw e;
      throw new ApiFailure(0, { code: 'NetworkError', msg: `${method} ${path}: ${e.message}` }, null);
    }
    if (!response.ok) throw await failureOf(response);
    if (options.raw) return response;
    const text = await response.text();
    return { body: text ? JSON.parse(text) : null, response };
  }

  // ---- errors --------------------------------------------------------------------------

  /** Shows a failure; `source` says what may clear it: a later good refresh, or only the user. */
  function showError(failure, source) {
    const box = $('error');
    $('error-code').textContent = failure.code || 'Error';
    $('error-msg').textContent = failure.msg || String(failure.message || failure);
    $('error-operation').textContent = failure.operationId || '-';
    box.dataset.code = failure.code || '';
    box.dataset.source = source;
    box.hidden = false;
  }

  function clearError(source) {
    const box = $('error');
    if (source === undefined || box.dataset.source === source) box.hidden = true;
  }

  /** A call failed: a dead session sends the user back to the login form. */
  function handleFailure(e, source) {
    if (e.name === 'AbortError') return;
    if (e.code === 'NotAuthenticated' && token()) {
      endSession();
      showError(e, 'user');
      return;
    }
    if (!(e instanceof ApiFailure)) {
      console.error(e);
      e = new ApiFailure(0, { code: 'ScriptError', msg: String(e.message || e) }, null);
    }
    showError(e, source);
  }

  // The policy blocks quietly; say so where the user looks.
  document.addEventListener('securitypolicyviolation', (e) => {
    document.body.dataset.cspViolations = String(Number(document.body.dataset.cspViolations || 0) + 1);
    showError({ code: 'ContentSecurityPolicy', msg: `blocked ${e.blockedURI || 'inline code'} (${e.violatedDirective})` }, 'user');
  });

  // ---- session -------------------------------------------------------------------------

  async function login(event) {
    event.preventDefault();
    const button = $('login-submit');
    button.disabled = true;
    try {
      const { response } = await call('POST', '/sessions', {
        type: 'localUser',
        localUser: $('login-user').value,
        localPassword: $('login-password').value,
      });
      const t = response.headers.get('X-VCAV-Auth');
      if (!t) throw new ApiFailure(response.status, { code: 'NoToken', msg: 'the login answer carried no X-VCAV-Auth header' }, response.headers.get('operationID'));
      sessionStorage.setItem(TOKEN_KEY, t);
      $('login-password').value = '';
      clearError();
      startDashboard();
    } catch (e) {
      handleFailure(e, 'user');
    } finally {
      button.disabled = false;
    }
  }

  async function logout() {
    try {
      await call('DELETE', '/sessions');
      clearError();
    } catch (e) {
      // Forgotten here either way; a failure is still worth seeing (the token may live on).
      if (e.code !== 'NotAuthenticated') showError(e, 'user');
    }
    endSession();
  }

  /** Forgets the session and everything seen with it, and shows the login form. */
  function endSession() {
    sessionStorage.removeItem(TOKEN_KEY);
    clearTimeout(state.refreshTimer);
    for (const controller of state.watchers.values()) controller.abort();
    state = freshState();
    $('sites-body').replaceChildren();
    $('tasks-body').replaceChildren();
    $('site-errors').replaceChildren();
    $('dashboard').hidden = true;
    $('session').hidden = true;
    $('login').hidden = false;
    document.body.dataset.view = 'login';
    $('login-user').focus();
  }

  function startDashboard() {
    $('login').hidden = true;
    $('dashboard').hidden = false;
    document.body.dataset.view = 'dashboard';
    refreshNow();
  }

  async function extend(site, button) {
    button.disabled = true;
    try {
      await call('POST', '/sessions/extend', { type: 'multisite', site });
      clearError('user');
    } catch (e) {
      handleFailure(e, 'user');
    } finally {
      button.disabled = false;
    }
    refreshNow();
  }

  async function dropExtension(site, button) {
    button.disabled = true;
    try {
      await call('DELETE', `/sessions/${encodeURIComponent(site)}`);
    } catch (e) {
      handleFailure(e, 'user');
    } finally {
      button.disabled = false;
    }
    refreshNow();
  }

  // ---- refresh -------------------------------------------------------------------------

  /** Refreshes at once (after an action), then every REFRESH_MS; never two at a time. */
  function refreshNow() {
    if (state.refreshing) {
      state.refreshAgain = true;
      return;
    }
    clearTimeout(state.refreshTimer);
    const mine = state;
    mine.refreshing = true;
    refresh(mine).finally(() => {
      mine.refreshing = false;
      // A logout in between replaced the state: that session's loop ends here.
      if (state !== mine || !token()) return;
      if (mine.refreshAgain) {
        mine.refreshAgain = false;
        refreshNow();
      } else {
        mine.refreshTimer = setTimeout(refreshNow, REFRESH_MS);
      }
    });
  }

  async function refresh(mine) {
    const [session, sites, tasks] = await Promise.allSettled([
      call('GET', '/sessions'),
      call('GET', '/sites'),
      call('GET', '/tasks?site=*'),
    ]);
    // Answers for a session that ended meanwhile are not shown to the next one.
    if (state !== mine || !token()) return;
    const failed = [session, sites, tasks].find((r) => r.status === 'rejected');
    if (failed) {
      handleFailure(failed.reason, 'refresh');
      if (!token()) return;
    } else {
      clearError('refresh');
    }
    if (session.status === 'fulfilled') renderSession(session.value.body);
    if (sites.status === 'fulfilled') renderSites(sites.value.body);
    if (tasks.status === 'fulfilled') {
      renderTasks(tasks.value.body, tasks.value.response.headers.get('operationID'));
    }
    $('refreshed').textContent = new Date().toLocaleTimeString();
  }

  function renderSession(details) {
    $('session-user').textContent = details.user;
    $('session').hidden = false;
    state.sessionSites = new Set((details.authenticatedSites || []).map((s) => s.site));
  }

  // ---- sites ---------------------------------------------------------------------------

  /** How a site's link looks from here: a class for the row and words for the user. */
  function linkHealth(site) {
    if (site.isLocal) return { health: 'local', text: 'this site' };
    const out = site.state && site.state.outgoingCommError;
    const incoming = site.state && site.state.incomingCommError;
    const circuit = site.link && site.link.circuit;
    if (circuit === 'open') return { health: 'down', text: `down (circuit open)${out ? `: ${out.code}` : ''}`, error: out };
    if (out) return { health: 'down', text: `unreachable: ${out.code}`, error: out };
    if (circuit === 'halfOpen') return { health: 'degraded', text: 'recovering (circuit half-open)' };
    if (incoming) return { health: 'degraded', text: `incoming link failing: ${incoming.code}`, error: incoming };
    return { health: 'up', text: 'up' };
  }

  function el(tag, props = {}, children = []) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(props)) {
      if (key === 'dataset') Object.assign(node.dataset, value);
      else node[key] = value;
    }
    node.append(...children);
    return node;
  }

  function time(ms) {
    return typeof ms === 'number' && ms >= 0 ? new Date(ms).toLocaleString() : '-';
  }

  /** Rebuilds a cell only when what it shows changed, so buttons are not replaced under a click. */
  function setCell(cell, key, build) {
    if (cell.dataset.key === key) return;
    cell.dataset.key = key;
    cell.replaceChildren(...build());
  }

  function renderSites(sites) {
    const body = $('sites-body');
    const keep = new Set();
    for (const site of sites) {
      if (site.isLocal) $('local-site').textContent = site.site;
      const id = `site-${site.site}`;
      keep.add(id);
      let row = $(id);
      if (!row) {
        row = el('tr', { id, dataset: { site: site.site } }, [
          el('td', { className: 'site-name' }),
          el('td', { className: 'site-health' }),
          el('td', { className: 'site-circuit' }),
          el('td', { className: 'site-rtt' }),
          el('td', { className: 'site-success' }),
          el('td', { className: 'site-session' }),
        ]);
      }
      body.append(row);
      const [name, healthCell, circuit, rtt, success, session] = row.children;
      const health = linkHealth(site);
      row.dataset.health = health.health;
      row.className = `health-${health.health}`;
      name.textContent = site.site;
      name.title = site.description || '';
      healthCell.textContent = health.text;
      healthCell.title = health.error ? `${health.error.code}: ${health.error.msg}` : '';
      const link = site.link;
      circuit.textContent = link ? link.circuit : '-';
      rtt.textContent = link && typeof link.roundTripMs === 'number' ? `${link.roundTripMs.toFixed(1)} ms` : '-';
      success.textContent = link ? time(link.lastSuccess) : '-';
      const extended = state.sessionSites.has(site.site);
      setCell(session, site.isLocal ? 'local' : `${extended}`, () => {
        if (site.isLocal) return ['logged in'];
        if (extended) {
          const drop = el('button', { type: 'button', id: `drop-${site.site}`, textContent: 'Drop' });
          drop.addEventListener('click', () => dropExtension(site.site, drop));
          return ['extended ', drop];
        }
        const button = el('button', { type: 'button', id: `extend-${site.site}`, textContent: 'Extend session' });
        button.addEventListener('click', () => extend(site.site, button));
        return [button];
      });
      row.dataset.extended = site.isLocal || extended ? 'true' : 'false';
    }
    for (const row of [...body.children]) if (!keep.has(row.id)) row.remove();
  }

  // ---- tasks ---------------------------------------------------------------------------

  const keyOf = (task) => `${task.site}/${task.id}`;

  function renderTasks(list, operationId) {
    const failedSites = new Map((list.siteErrors || []).map((e) => [e.site, e.error]));
    const errors = $('site-errors');
    errors.replaceChildren(...[...failedSites].map(([site, error]) =>
      el('li', { dataset: { site, code: error.code } }, [
        el('strong', { textContent: site }), ': ',
        el('code', { textContent: error.code }), ` ${error.msg} `,
        el('span', { className: 'muted', textContent: `(operationID ${operationId || '-'}; showing the last tasks seen there)` }),
      ])));
    $('tasks-total').textContent = `${list.total} total`;

    // A site that did not answer keeps its last known rows, marked stale, rather than
    // looking as if its tasks were gone.
    const order = [];
    const seen = new Set();
    for (const task of list.items) {
      const key = keyOf(task);
      seen.add(key);
      applyTask(task, false);
      state.tasks.get(key).stale = false;
      order.push(key);
    }
    for (const [key, entry] of state.tasks) {
      if (seen.has(key)) continue;
      if (failedSites.has(entry.task.site)) {
        entry.stale = true;
        order.push(key);
      } else {
        forget(key);
      }
    }
    const body = $('tasks-body');
    order.sort((a, b) => state.tasks.get(b).task.startTime - state.tasks.get(a).task.startTime);
    for (const key of order) {
      const entry = state.tasks.get(key);
      const row = entry.row;
      row.classList.toggle('stale', entry.stale);
      row.dataset.stale = String(entry.stale);
      body.append(row);
    }
    $('tasks-empty').hidden = order.length > 0;
    startStreams(order);
  }

  function forget(key) {
    const controller = state.watchers.get(key);
    if (controller) controller.abort();
    state.watchers.delete(key);
    state.retryAt.delete(key);
    const entry = state.tasks.get(key);
    if (entry) entry.row.remove();
    state.tasks.delete(key);
  }

  /**
   * Takes a task from the list or from its stream: whichever is newer wins, so a slow list
   * answer never moves a bar backwards. Returns whether it was taken.
   */
  function applyTask(task, fromStream) {
    const key = keyOf(task);
    let entry = state.tasks.get(key);
    if (!entry) {
      entry = { task, events: 0, stale: false, row: newRow(task) };
      state.tasks.set(key, entry);
    } else if (entry.task.lastUpdated > task.lastUpdated) {
      return false;
    }
    entry.task = task;
    if (fromStream) entry.events += 1;
    updateRow(entry);
    return true;
  }

  function newRow(task) {
    const progress = el('progress', { id: `progress-${task.id}`, max: 100, value: 0 });
    progress.setAttribute('aria-valuemin', '0');
    progress.setAttribute('aria-valuemax', '100');
    return el('tr', { id: `task-${task.id}`, dataset: { taskId: task.id, site: task.site } }, [
      el('td', { className: 'task-site' }),
      el('td', { className: 'task-type' }),
      el('td', { className: 'task-resource' }),
      el('td', { className: 'task-state' }),
      el('td', { className: 'task-progress' }, [progress, el('span', { className: 'pct' })]),
      el('td', { className: 'task-started' }),
    ]);
  }

  function updateRow(entry) {
    const { task, row } = entry;
    const info = task.workflowInfo || {};
    const [site, type, resource, stateCell, progressCell, started] = row.children;
    site.textContent = task.site;
    type.textContent = info.type || '-';
    resource.textContent = [info.resourceType, info.resourceName || info.resourceId].filter(Boolean).join(' ') || '-';
    resource.title = info.resourceId || '';
    stateCell.textContent = task.state;
    stateCell.title = task.error ? `${task.error.code}: ${task.error.msg}` : '';
    const [bar, pct] = progressCell.children;
    bar.value = task.progress;
    bar.setAttribute('aria-valuenow', String(task.progress));
    bar.setAttribute('aria-label', `${task.progress}% done`);
    pct.textContent = `${task.progress}%`;
    started.textContent = time(task.startTime);
    row.dataset.state = task.state;
    row.dataset.progress = String(task.progress);
    row.dataset.events = String(entry.events);
    row.dataset.live = String(state.watchers.has(keyOf(task)));
    row.className = `state-${task.state.toLowerCase()}`;
    row.classList.toggle('stale', entry.stale);
  }

  // ---- live progress -------------------------------------------------------------------

  /** Follows the first running tasks in list order (newest first), up to MAX_STREAMS. */
  function startStreams(order) {
    const now = Date.now();
    for (const key of order) {
      if (state.watchers.size >= MAX_STREAMS) return;
      const entry = state.tasks.get(key);
      if (entry.stale || entry.task.state !== 'RUNNING' || state.watchers.has(key)) continue;
      if ((state.retryAt.get(key) || 0) > now) continue;
      const controller = new AbortController();
      state.watchers.set(key, controller);
      const mine = state;
      const follow = CAN_STREAM ? followEvents : followBlockingReads;
      follow(entry.task, controller.signal)
        .catch((e) => {
          if (e.name === 'AbortError') return;
          // The refresh shows the site's trouble; a stream that cannot be opened is quiet.
          console.warn(`following ${key}:`, e);
        })
        .finally(() => {
          if (mine !== state || mine.watchers.get(key) !== controller) return;
          mine.watchers.delete(key);
          const current = mine.tasks.get(key);
          if (current && current.task.state === 'RUNNING') {
            mine.retryAt.set(key, Date.now() + STREAM_RETRY_MS);
          }
          if (current) current.row.dataset.live = 'false';
        });
      entry.row.dataset.live = 'true';
    }
  }

  const taskPath = (task, suffix, query) =>
    `/tasks/${encodeURIComponent(task.id)}${suffix}?site=${encodeURIComponent(task.site)}${query || ''}`;

  /**
   * Reads `GET /tasks/{id}/events` as it arrives. EventSource cannot send the X-VCAV-Auth
   * header, so the stream is read with fetch() and its lines parsed here: `event:` and
   * `data:` fields, a blank line ends an event, lines starting with `:` are keep-alives.
   */
  async function followEvents(task, signal) {
    const response = await call('GET', taskPath(task, '/events'), undefined, {
      accept: 'text/event-stream',
      signal,
      raw: true,
    });
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = '';
    let eventName = '';
    let data = [];
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      buffer += decoder.decode(value, { stream: true });
      for (;;) {
        const end = buffer.search(/\r\n|\r|\n/);
        // A CR at the very end may be the first half of a CRLF still on its way.
        if (end < 0 || (end === buffer.length - 1 && buffer[end] === '\r')) break;
        const line = buffer.slice(0, end);
        buffer = buffer.slice(buffer.startsWith('\r\n', end) ? end + 2 : end + 1);
        if (line === '') {
          if (data.length > 0 && (eventName === 'task' || eventName === '')) {
            applyTask(JSON.parse(data.join('\n')), true);
          }
          eventName = '';
          data = [];
          continue;
        }
        if (line.startsWith(':')) continue;
        const colon = line.indexOf(':');
        const field = colon < 0 ? line : line.slice(0, colon);
        let fieldValue = colon < 0 ? '' : line.slice(colon + 1);
        if (fieldValue.startsWith(' ')) fieldValue = fieldValue.slice(1);
        if (field === 'event') eventName = fieldValue;
        else if (field === 'data') data.push(fieldValue);
      }
    }
  }

  /** The same without streaming bodies: blocking reads, each answered at a change or in 30 s. */
  async function followBlockingReads(task, signal) {
    let current = task;
    while (current.state === 'RUNNING') {
      const query = `&waitForChange=true&timeout=30s&lastUpdated=${current.lastUpdated}`;
      const { body } = await call('GET', taskPath(current, '', query), undefined, { signal });
      if (body.lastUpdated !== current.lastUpdated) applyTask(body, true);
      current = body;
    }
  }

  // ---- start ---------------------------------------------------------------------------

  $('login-form').addEventListener('submit', login);
  $('logout').addEventListener('click', logout);
  $('error-dismiss').addEventListener('click', () => clearError());
  if (token()) {
    startDashboard();
  } else {
    endSession();
  }
})();
