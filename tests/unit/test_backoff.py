from tlshd.supervisor.backoff import Backoff


def test_doubles_and_caps():
    b = Backoff(base=0.5, cap=4.0, stable=30.0, rand=lambda: 1.0)
    b.started(0.0)
    delays = [b.failed(1.0) - 1.0 for _ in range(6)]
    assert delays == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]


def test_jitter_halves_at_most():
    b = Backoff(base=2.0, rand=lambda: 0.0)
    assert b.failed(10.0) == 11.0


def test_forgiven_after_stable_run():
    b = Backoff(base=1.0, stable=30.0, rand=lambda: 1.0)
    b.started(0.0)
    b.failed(1.0)
    b.failed(2.0)
    b.started(3.0)
    assert b.failed(40.0) == 41.0  # back to the base delay
