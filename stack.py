"""K students as one network: one batched call for K denoisers of one architecture (MSD App. J.1, item 4).

The paper trains its K students separately. The partitions are disjoint, so the students step
independently, and nothing but time and memory forbids stepping them together: `Stack` holds
K networks' parameters as tensors with a leading K axis (as torch.func.stack_module_state) and
evaluates all K in one call, vmap over torch.func.functional_call (PyTorch turns each student's
convolution into one grouped convolution). We chose vmap over hand-written grouped weights because
it keeps edm_unet.py the single definition of the network and checkpoints stay per student.

Inputs and outputs are flat, K blocks of B rows, (K*B, ...), so every loss of dmd.py applies
unchanged and the teacher (one network) sees the K batches as one batch of K*B. The stacked
tensors are ordinary parameters: AdamW is elementwise, so one AdamW over the stack is K separate
AdamWs, and `clip_per_student` clips each student's gradient norm on its own, as K separate runs
would. `student(k)` moves one student's weights out in the format of a single network (edm_unet's
state_dict), so msd.py writes each student's student.pt as a run of its own would.

One shared fake score (`msd.py --shared-fake`). The partitions Y_1..Y_K are disjoint, so the K
students together are one class-conditional generator, G(z, y) = G_k(z, y) for y in Y_k, and a
class-conditional fake score mu_fake(x_t, t, y) trained by Eq. 8 on all students' samples with
their labels estimates, at a label y in Y_k, the denoiser of student k's distribution: exactly the
mu_fake that student k's own Eq. 6 needs (DM gradient mu_fake(x_t, t, y) - mu_real(x_t, t, y) at
y in Y_k). Only the parameters are shared, as the teacher shares its parameters across classes;
the target of every student's Eq. 6 is unchanged. What changes is what the one network must fit
(K students' distributions at once, with the capacity of one) and its batch (K*B samples per
Eq. 8 step, each with its own t and noise, one optimiser), so its memory is one fake score and its
optimiser state instead of K.
It starts from `--fake-init` (a student-sized network, e.g. the K = 1 TSM student) or, without
it, from the teacher, which for TSM-sized students is the larger network.

Limits of stepping together: a non-finite gradient in one student skips the step of all K (one
optimiser; `--max-bad-steps` counts these steps once for the K), and under fp16 one GradScaler
serves all K, so one student's overflow lowers the loss scale of all.
"""
import copy

import torch
import torch.nn as nn
from torch.func import functional_call, vmap


class Stack(nn.Module):
    """K copies of one architecture, evaluated together. (K*B, ...) inputs -> (K*B, ...) outputs."""

    def __init__(self, nets):
        super().__init__()
        params = [dict(n.named_parameters()) for n in nets]
        buffers = [dict(n.named_buffers()) for n in nets]
        self.K, self.names, self.buffer_names = len(nets), list(params[0]), list(buffers[0])
        self.stacked = nn.ParameterList([nn.Parameter(torch.stack([p[n].detach() for p in params]))  # (K, ...) each
                                         for n in self.names])
        for i, n in enumerate(self.buffer_names):
            self.register_buffer(f"buffer{i}", torch.stack([b[n] for b in buffers]))
        self.template = [copy.deepcopy(nets[0]).to("meta")]  # the architecture only; a list keeps it out of .parameters()
        self.cfg = nets[0].cfg

    def forward(self, x, sigma, labels):
        K = self.K
        split = lambda t: t.reshape(K, -1, *t.shape[1:])  # noqa: E731  (K*B, ...) -> (K, B, ...)
        params = dict(zip(self.names, self.stacked))
        buffers = {n: getattr(self, f"buffer{i}") for i, n in enumerate(self.buffer_names)}
        call = lambda p, b, *a: functional_call(self.template[0], (p, b), a)  # noqa: E731
        out = vmap(call)(params, buffers, split(x), split(sigma), split(labels))
        return out.reshape(-1, *out.shape[2:])

    def student(self, k):
        """Student k's weights as the single network's state_dict."""
        state = {n: p[k].detach().clone() for n, p in zip(self.names, self.stacked)}
        state.update({n: getattr(self, f"buffer{i}")[k].clone() for i, n in enumerate(self.buffer_names)})
        return state


def unstack(stack):
    """The K students as K single networks (edm_unet's EDMPrecond), on the stack's device."""
    nets = []
    for k in range(stack.K):
        net = copy.deepcopy(stack.template[0]).to_empty(device=stack.stacked[0].device)
        net.load_state_dict(stack.student(k))
        nets.append(net)
    return nets


def clip_grad_norm_(module, max_norm):
    """torch.nn.utils.clip_grad_norm_, per student for a Stack. -> the norm before clipping (a
    stack's: the mean of its students', finite only if every one is: norms are >= 0)."""
    if isinstance(module, Stack):
        return clip_per_student(module, max_norm).mean()
    return torch.nn.utils.clip_grad_norm_(module.parameters(), max_norm)


def clip_per_student(stack, max_norm):
    """torch.nn.utils.clip_grad_norm_ for each student of the stack on its own. -> (K,) norms before clipping."""
    grads = [p.grad for p in stack.stacked if p.grad is not None]
    norms = torch.stack([g.flatten(1).norm(dim=1) for g in grads]).norm(dim=0)  # (K,)
    coef = (max_norm / (norms + 1e-6)).clamp(max=1.0)
    for g in grads:
        g.mul_(coef.view(-1, *([1] * (g.ndim - 1))).to(g.dtype))
    return norms


if __name__ == "__main__":
    raise SystemExit("stack.py holds the stacked students; train them with python msd.py --all-students ... (python msd.py --help)")
