"""The client update and on-device fine-tuning."""

import torch

from federation.client import client_update, local_finetune
from federation.config import ClientConfig
from models import params as P
from models.lm import WordLM, WordTable
from models.train import encode, evaluate_loss


def test_local_finetune_leaves_the_model_and_is_seeded(tiny_loaded, fixture_users):
    ck, tok = tiny_loaded
    before = P.clone(ck.model.state_dict())
    u = fixture_users[1]
    a = local_finetune(ck.model, ck.vocab, tok, u.history, ClientConfig(), torch.Generator().manual_seed(1))
    b = local_finetune(ck.model, ck.vocab, tok, u.history, ClientConfig(), torch.Generator().manual_seed(1))
    assert all(torch.equal(before[k], v) for k, v in ck.model.state_dict().items())
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert P.global_norm(P.delta(a, before)) > 0


def test_client_update_reports_local_minus_global(tiny_loaded, fixture_users):
    ck, tok = tiny_loaded
    g = P.clone(ck.model.state_dict())
    u = fixture_users[1]
    cfg = ClientConfig()
    res = client_update(g, WordLM(ck.model.cfg), ck.vocab, tok, u.history, cfg, torch.Generator().manual_seed(2))
    local = local_finetune(ck.model, ck.vocab, tok, u.history, cfg, torch.Generator().manual_seed(2))
    assert all(torch.equal(res.delta[k], local[k] - g[k]) for k in g)
    assert res.num_words == len(encode(u.history, ck.vocab)) and res.steps > 0 and res.loss > 0
    out = {k: torch.empty_like(v) for k, v in g.items()}  # the parallel engine's shared buffers
    into = client_update(g, WordLM(ck.model.cfg), ck.vocab, tok, u.history, cfg, torch.Generator().manual_seed(2), out=out)
    assert into.delta is out and all(torch.equal(out[k], res.delta[k]) for k in g)


def test_a_client_trains_without_dropout_unless_asked(tiny_loaded, fixture_users):
    """By default (README: dropout off does better federated) the generator draws no masks, so
    the delta does not depend on it; with dropout it does."""
    ck, tok = tiny_loaded
    g = P.clone(ck.model.state_dict())
    u = fixture_users[1]

    def delta(cfg, seed):
        return client_update(g, WordLM(ck.model.cfg), ck.vocab, tok, u.history, cfg, torch.Generator().manual_seed(seed)).delta

    a, b = delta(ClientConfig(), 1), delta(ClientConfig(), 2)
    assert all(torch.equal(a[k], b[k]) for k in a) and P.global_norm(a) > 0
    c, d = delta(ClientConfig(dropout=True), 1), delta(ClientConfig(dropout=True), 2)
    assert not all(torch.equal(c[k], d[k]) for k in c)


def test_too_little_history_gives_zero_weight(tiny_loaded):
    ck, tok = tiny_loaded
    g = P.clone(ck.model.state_dict())
    res = client_update(g, WordLM(ck.model.cfg), ck.vocab, tok, [], ClientConfig(), torch.Generator())
    assert res.num_words == 0 and res.steps == 0 and P.global_norm(res.delta) == 0


def test_personalization_lowers_most_users_loss(tiny_loaded, fixture_users):
    """Fine-tuning on a user's history helps on the same user's future text (lr tuned for the tiny model)."""
    ck, tok = tiny_loaded
    table = WordTable.build(ck.vocab, tok, ck.model.cfg.base_vocab)
    users = [u for u in fixture_users if len(u.history) >= 40][:8]
    better = 0
    for i, u in enumerate(users):
        fut = encode(u.future, ck.vocab)
        before = evaluate_loss(ck.model, table, fut)
        m = WordLM(ck.model.cfg)
        m.load_state_dict(local_finetune(ck.model, ck.vocab, tok, u.history, ClientConfig(lr=0.1), torch.Generator().manual_seed(i)))
        better += evaluate_loss(m, table, fut) < before
    assert better > len(users) / 2


def test_personal_models_use_the_personalization_setting():
    """The keyboard's Learn now and the report's personalization study fine-tune with lr 0.1 x 3 epochs,
    the rest of the client step unchanged (federated clients keep lr 0.3 x 1 epoch)."""
    import dataclasses

    from federation.config import ClientConfig, personalization_config
    from keyboard.session import LearnConfig

    fed = ClientConfig(batch_size=4, max_words=123)
    personal = personalization_config(fed)
    assert (personal.lr, personal.epochs) == (0.1, 3.0) and (fed.lr, fed.epochs) == (0.3, 1.0)
    assert dataclasses.replace(personal, lr=fed.lr, epochs=fed.epochs) == fed
    assert LearnConfig().client == personalization_config()


def test_personal_fine_tuning_keeps_small_batches():
    from federation.config import ClientConfig, personalization_config

    for fed_batch, personal_batch in ((32, 8), (8, 8), (4, 4)):
        personal = personalization_config(ClientConfig(batch_size=fed_batch))
        assert (personal.batch_size, personal.lr, personal.epochs) == (personal_batch, 0.1, 3.0)


def test_the_parallel_engine_hands_out_the_longest_histories_first(tmp_path):
    """Longest-processing-time-first: the short clients come last, so the workers finish together."""
    from federation.device import Device
    from federation.engine_parallel import longest_first
    from federation.engine_sequential import ClientTask

    sizes = {"a": 3, "b": 40, "c": 12, "d": 12}
    for user, n in sizes.items():
        Device(tmp_path, user).write_simulated([f"message {i} from {user}" for i in range(n)], [])
    tasks = [ClientTask(i, i, user, 100 + i) for i, user in enumerate([*sizes, "missing"])]
    order = [t.real_id for t in longest_first(tasks, tmp_path)]
    assert order == ["b", "c", "d", "a", "missing"]  # ties keep the round's order; a missing device last
