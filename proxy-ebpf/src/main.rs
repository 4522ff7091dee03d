//! xdproxy kernel programs: thin entry points over shared parse, lb and nat code.
//!
//! XDP is for interfaces whose packets carry full checksums (traffic from the
//! wire). TC is for interfaces fed by local sockets (pod veths), whose packets
//! may carry only a partial checksum that XDP cannot see; its helpers fix the
//! pseudo-header sum correctly either way.
#![no_std]
#![no_main]

mod affinity;
mod bench;
mod ct;
mod lb;
mod maps;
mod nat;
mod parse;
mod ranges;
mod reject;

use aya_ebpf::{
    bindings::xdp_action,
    macros::{classifier, xdp},
    programs::{TcContext, XdpContext},
};
use lb::{Stage, Verdict};
use proxy_common::Counter;

const TC_ACT_OK: i32 = 0;
const TC_ACT_SHOT: i32 = 2;

#[xdp]
pub fn xdproxy_xdp(ctx: XdpContext) -> u32 {
    try_xdp(&ctx).unwrap_or(xdp_action::XDP_PASS)
}

fn try_xdp(ctx: &XdpContext) -> Result<u32, ()> {
    let (start, end) = (ctx.data(), ctx.data_end());
    let Some(flow) = parse::flow(start, end) else {
        return Ok(xdp_action::XDP_PASS);
    };
    match lb::decide(&flow, (end - start) as u64, Stage::Ingress) {
        Verdict::Pass => {}
        Verdict::Rewrite(rewrite) => nat::xdp(ctx, &flow, &rewrite)?,
        Verdict::Drop => return Ok(xdp_action::XDP_DROP),
        Verdict::Reject => return Ok(reject::xdp(ctx, &flow, start, end)),
    }
    Ok(xdp_action::XDP_PASS)
}

#[classifier]
pub fn xdproxy_tc(ctx: TcContext) -> i32 {
    try_tc(&ctx, Stage::Ingress).unwrap_or(TC_ACT_OK)
}

/// Translates the replies of frontends on the node's own addresses on their
/// way out to the client (see `SVC_REPLY_AT_EGRESS`).
#[classifier]
pub fn xdproxy_tc_out(ctx: TcContext) -> i32 {
    try_tc(&ctx, Stage::Egress).unwrap_or(TC_ACT_OK)
}

fn try_tc(ctx: &TcContext, stage: Stage) -> Result<i32, ()> {
    // Headers of locally built packets are linear already; pull in case not.
    if ctx.data_end() - ctx.data() < parse::MAX_HEADERS {
        let _ = ctx.pull_data(ctx.len().min(parse::MAX_HEADERS as u32));
    }
    let Some(flow) = parse::flow(ctx.data(), ctx.data_end()) else {
        return Ok(TC_ACT_OK);
    };
    let rewrite = match lb::decide(&flow, ctx.len() as u64, stage) {
        Verdict::Pass => return Ok(TC_ACT_OK),
        Verdict::Rewrite(rewrite) => rewrite,
        Verdict::Drop => return Ok(TC_ACT_SHOT),
        Verdict::Reject => return Ok(reject::tc(ctx, &flow)),
    };
    if nat::tc(ctx, &flow, &rewrite).is_err() {
        // A half-rewritten packet would reach the wrong place or fail its
        // checksum: drop it and say so.
        maps::count(Counter::RewriteFailed);
        return Ok(TC_ACT_SHOT);
    }
    Ok(TC_ACT_OK)
}

/// Does nothing: the benchmark's baseline, loaded from the same object.
#[xdp]
pub fn xdproxy_empty(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_PASS
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
