"""Stand-ins for what the desktop app talks to besides Service: the Windows
registry (winreg's API), an OAuth login session, pystray, and an X11 system
tray (a panel's tray area) for the Xvfb tests."""
import select
import threading


class FakeRegistry:
    """The part of winreg that autostart and theme detection use, over a dict
    {key path: {value name: (value, type)}} of HKEY_CURRENT_USER."""

    HKEY_CURRENT_USER = "HKCU"
    REG_SZ, REG_DWORD = 1, 4
    KEY_READ, KEY_SET_VALUE = 0x20019, 0x0002

    def __init__(self, values=None):
        self.keys = {path: dict(entries) for path, entries in (values or {}).items()}

    class _Key:
        def __init__(self, registry, path):
            self.registry, self.path = registry, path

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    def _check_root(self, root):
        assert root == self.HKEY_CURRENT_USER, "only HKCU is used"

    def CreateKey(self, root, path):
        self._check_root(root)
        self.keys.setdefault(path, {})
        return self._Key(self, path)

    def OpenKey(self, root, path, reserved=0, access=KEY_READ):
        self._check_root(root)
        if path not in self.keys:
            raise FileNotFoundError(2, "The system cannot find the file specified")
        return self._Key(self, path)

    def SetValueEx(self, key, name, reserved, kind, value):
        self.keys[key.path][name] = (value, kind)

    def QueryValueEx(self, key, name):
        try:
            return self.keys[key.path][name]
        except KeyError:
            raise FileNotFoundError(2, "The system cannot find the file specified") from None

    def DeleteValue(self, key, name):
        try:
            del self.keys[key.path][name]
        except KeyError:
            raise FileNotFoundError(2, "The system cannot find the file specified") from None


class FakeSession:
    """A LoginSession as Service.login_start returns it: url, wait for the browser, close."""

    def __init__(self):
        self.url = "http://127.0.0.1:1/oauth?state=abc"
        self.closed = False
        self.arrived = threading.Event()
        self.outcome = None  # ("code", value) or ("error", message)

    def close(self):
        self.closed = True
        if self.outcome is None:
            self.outcome = ("error", "the login was cancelled")
        self.arrived.set()


class FakeLoginService:
    """login_start/login_finish like Service, with the browser played by the test."""

    def __init__(self):
        self.session = None
        self.finished = []

    def login_start(self, headless=False):
        self.session = FakeSession()
        return self.session

    def login_finish(self, session, pasted=None, timeout_s=300.0, add=False):
        if pasted is None:
            if not session.arrived.wait(timeout_s):
                raise RuntimeError("no login in time")
        else:
            session.outcome = ("code", pasted) if pasted.startswith("code") else ("error", "state mismatch")
            session.arrived.set()
        kind, value = session.outcome
        if kind == "error":
            raise RuntimeError(value)
        self.finished.append((value, add))
        return "acct-" + value


class FakePystray:
    """pystray's Icon/Menu/MenuItem surface; Icon.HAS_MENU as the backend says."""

    def __init__(self, has_menu=True):
        fake = self

        class MenuItem:
            def __init__(self, text, action, default=False, **_kw):
                self._text, self.action, self.default = text, action, default

            @property
            def text(self):
                return self._text(self) if callable(self._text) else self._text

            def __call__(self, icon):
                return self.action(icon, self)

        class Menu:
            def __init__(self, *items):
                self.items = items

        class Icon:
            HAS_MENU = has_menu

            def __init__(self, name, icon, title, menu):
                self.name, self.icon, self.title, self.menu = name, icon, title, menu
                self.visible, self.menu_updates, self.stopped = False, 0, False
                self.ready = threading.Event()
                fake.icons.append(self)

            def run(self, setup=None):  # the real one loops until stop(); here setup is all there is
                (setup or (lambda icon: None))(self)
                self.ready.set()

            run_detached = run

            def update_menu(self):
                self.menu_updates += 1

            def stop(self):
                self.stopped = True

            def __call__(self):  # a click: the default item
                next(i for i in self.menu.items if i.default)(self)

        self.icons = []
        self.Icon, self.Menu, self.MenuItem = Icon, Menu, MenuItem


class FakeSystemTray:
    """A minimal XEMBED system tray manager on an X display (what a panel provides):
    owns _NET_SYSTEM_TRAY_S<screen>, and on a dock request reparents the icon window
    into its own 48x48 window at the top left of the screen and maps it."""

    REQUEST_DOCK = 0

    def __init__(self, display_name: str):
        from Xlib import X, display
        self.X = X
        self.display = display.Display(display_name)
        screen = self.display.screen()
        self.window = screen.root.create_window(0, 0, 48, 48, 0, screen.root_depth,
                                                background_pixel=screen.white_pixel,
                                                event_mask=X.StructureNotifyMask | X.SubstructureNotifyMask)
        self.window.map()
        selection = self.display.intern_atom("_NET_SYSTEM_TRAY_S%d" % self.display.get_default_screen())
        self.opcode = self.display.intern_atom("_NET_SYSTEM_TRAY_OPCODE")
        self.window.set_selection_owner(selection, X.CurrentTime)
        self.display.sync()
        self.docked = []  # window ids of docked icons
        self.docked_event = threading.Event()
        self._stop = False
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self):
        while not self._stop:
            readable, _w, _x = select.select([self.display.fileno()], [], [], 0.1)
            while self.display.pending_events():
                event = self.display.next_event()
                if event.type == self.X.ClientMessage and event.client_type == self.opcode:
                    data = event.data[1]
                    if data[1] == self.REQUEST_DOCK:
                        self._dock(data[2])

    def _dock(self, window_id):
        icon = self.display.create_resource_object("window", window_id)
        icon.reparent(self.window, 0, 0)
        icon.configure(width=48, height=48)
        icon.map()
        self.display.sync()
        self.docked.append(window_id)
        self.docked_event.set()

    def close(self):
        self._stop = True
        self._thread.join(2)
        self.window.destroy()
        self.display.close()
